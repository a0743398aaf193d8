"""`colaflow serve`: the adaptation server (model host + worker and control gRPC services).

    colaflow serve --model smollm2-135m --port 7000 --tokens tokens.txt

prints `colaflow serve: listening on HOST:PORT`, then `colaflow serve: status page at http://HOST:PORT/`
(the page, /metrics and the JSON API: server/status.py; by default on the gRPC port + 1).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the adaptation server")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, tiny-gpt2, or an HF directory")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (a non-loopback one needs TLS "
                   "and --tokens, or --insecure)")
    p.add_argument("--port", type=int, default=7000, help="0 picks a free port (printed)")
    p.add_argument("--tls-cert", help="the server's certificate (PEM); serve TLS, with --tls-key")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    p.add_argument("--tokens", help="file of `TOKEN ROLE` lines; without it every caller is admin")
    p.add_argument("--state-dir", help="jobs and a per-step snapshot live here; a restarted server resumes them")
    p.add_argument("--reassign-after", type=float, default=30.0, help="seconds before a lost worker's sites move")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without TLS and tokens (a warning is logged)")
    p.add_argument("--mix", action="store_true",
                   help="run every ready job in one mixed forward (throughput) instead of one job per step "
                        "(bit-for-bit deterministic runs)")
    p.add_argument("--mix-rows", type=int, default=6,
                   help="with --mix: the rows of one micro-batch (whole jobs; a larger job runs alone). "
                        "Bounds the step's activation memory; more rows, more batching")
    p.add_argument("--no-layered", dest="layered", action="store_false",
                   help="start a step only once every site's version is in (by default a step starts as soon "
                        "as nothing else can run, and its forward waits at each site still fitting)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    p.add_argument("--classes", type=int, default=0,
                   help="serve sequence-classification jobs with N classes (colaflow.classifier: frozen body, "
                        "pooling, a head every job trains on its devices); rows carry `label`")
    p.add_argument("--pooling", choices=["last", "mean", "cls"], help="with --classes (default: by architecture)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: torch's default)")
    p.add_argument("--max-tenant-jobs", type=int, default=32,
                   help="live (waiting or running) jobs one tenant may hold; each holds server memory")
    p.add_argument("--max-upload-mb", type=int, default=256,
                   help="the largest data map a client may upload for one job (MiB); all uploads held at once "
                        "are capped at 4x this, one tenant's at 2x")
    p.add_argument("--http-port", type=_http_port, default=None, metavar="PORT|off",
                   help="the status page, /metrics and the JSON API (same host, tokens and TLS): a port, 0 for a "
                        "free one, or `off` (default: the gRPC port + 1, or a free port when that one is taken "
                        "or --port is 0)")
    p.add_argument("--tensorboard", metavar="DIR", help="write every job's metrics as TensorBoard scalars "
                                                        "under DIR/JOB (needs `pip install tensorboard`)")


def _http_port(value: str) -> int | str:
    if value == "off":
        return value
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port (0-65535) or `off`, got {value!r}")
    return int(value)


def _port_free(host: str, port: int) -> bool:
    try:
        _check_port_free(host, port)
        return True
    except SystemExit:
        return False


def load_model(name: str):
    """(model, tokenizer); tiny-* models have no tokenizer (None)."""
    from colaflow.models import load, tiny

    if name.startswith("tiny-"):
        return tiny(name[len("tiny-"):]), None
    return load(name)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int, flag: str = "--port") -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: only a live listener fails
            s.bind((host, port))
    except OSError as e:
        raise SystemExit(f"colaflow serve: cannot listen on {host}:{port}: {e.strerror} "
                         f"(another colaflow serve? pick another {flag})") from None


def _read(path: str, flag: str) -> bytes:
    try:
        return open(path, "rb").read()
    except OSError as e:
        raise SystemExit(f"colaflow serve: cannot read {flag} {path!r}: {e.strerror}") from None


def _check_key_pair(cert: str, key: str) -> None:
    """Refuse now a certificate and key that do not match (swapped, say): gRPC would only fail to listen."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise SystemExit(f"colaflow serve: --tls-cert {cert!r} and --tls-key {key!r} are not a PEM certificate and "
                         f"its private key ({e.reason or e}): swapped, or another pair?") from None


def _status_page(args: argparse.Namespace, coordinator, tokens, grpc_port: int):
    """Start the HTTP status page, /metrics and JSON API (None with `--http-port off`); print its URL."""
    if args.http_port == "off":
        return None
    from colaflow.server.status import StatusServer

    port = args.http_port
    if port is None:  # the default: next to the gRPC port when that one is free, else any free port
        port = grpc_port + 1 if args.port and grpc_port < 65535 and _port_free(args.host, grpc_port + 1) else 0
    files = (args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        status = StatusServer(coordinator, tokens, args.host, port, files).start()
    except OSError as e:
        raise SystemExit(f"colaflow serve: cannot serve the status page on {args.host}:{port}: "
                         f"{e.strerror or e} (pick another --http-port, or --http-port off)") from None
    print(f"colaflow serve: status page at {status.url}", flush=True)
    return status


def run(args: argparse.Namespace) -> int:
    import torch

    from colaflow.host import Host
    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.service import make_server
    from colaflow.server.store import DirStore
    from colaflow.server.uploads import UploadLimits

    logging.basicConfig(level=os.environ.get("COLAFLOW_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("colaflow serve: --tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        ca = _read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
        tls = (_read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"), ca)
        _check_key_pair(args.tls_cert, args.tls_key)
    from colaflow.wire import tune_allocator

    tune_allocator()
    if args.tokens:
        _read(args.tokens, "--tokens")
    tokens = Tokens.load(args.tokens)
    if not _loopback(args.host) and not (tls and tokens.enabled):
        missing = " and ".join(x for x, ok in (("TLS (--tls-cert/--tls-key)", tls), ("tokens (--tokens)", tokens.enabled))
                               if not ok)
        if not args.insecure:
            raise SystemExit(f"colaflow serve: {args.host} is not a loopback address and the server has no "
                             f"{missing}: anyone who reaches it could act as admin. Add them, or pass --insecure.")
        logging.getLogger("colaflow.server").warning("serving %s without %s (--insecure)", args.host, missing)
    if args.port:
        _check_port_free(args.host, args.port)  # before the model loads: fail in a second, not a minute
    if isinstance(args.http_port, int) and args.http_port:
        _check_port_free(args.host, args.http_port, "--http-port, or --http-port off")
    tensorboard = None
    if args.tensorboard:
        from colaflow.server.tblog import TensorBoardLog

        tensorboard = TensorBoardLog.check(args.tensorboard)  # a missing package fails now, clearly
    store = DirStore(args.state_dir) if args.state_dir else None
    if args.mix_rows < 1:
        raise SystemExit(f"colaflow serve: --mix-rows must be >= 1, got {args.mix_rows}")
    if args.max_tenant_jobs < 1:
        raise SystemExit(f"colaflow serve: --max-tenant-jobs must be >= 1, got {args.max_tenant_jobs}")
    if args.max_upload_mb < 1:
        raise SystemExit(f"colaflow serve: --max-upload-mb must be >= 1, got {args.max_upload_mb}")
    model, tokenizer = load_model(args.model)
    if args.classes:
        from colaflow.classify import classifier
        from colaflow.loss import seq_cls

        host = Host(classifier(model, args.classes, args.pooling).to(args.device), seq_cls, mix_rows=args.mix_rows)
    else:
        if getattr(model, "get_output_embeddings", lambda: None)() is None:  # e.g. an encoder (AutoModel)
            raise SystemExit(f"colaflow serve: {args.model!r} ({type(model).__name__}) has no language-model head to "
                             "train against: serve it for sequence classification with --classes N")
        host = Host(model.to(args.device), mix_rows=args.mix_rows)
    coordinator = Coordinator(host, reassign_after=args.reassign_after, store=store,
                              mix=args.mix, layered=args.layered, max_tenant_jobs=args.max_tenant_jobs)
    mb = args.max_upload_mb << 20
    limits = UploadLimits(max_bytes=mb, max_total=4 * mb, max_per_tenant=2 * mb)
    try:
        server, port = make_server(coordinator, tokens, f"{args.host}:{args.port}", tls, model_name=args.model,
                                   tokenizer=tokenizer, upload_limits=limits)
    except OSError as e:
        raise SystemExit(f"colaflow serve: {e}") from None
    server.start()
    print(f"colaflow serve: listening on {args.host}:{port}", flush=True)
    try:
        status = _status_page(args, coordinator, tokens, port)
    except SystemExit:
        server.stop(0)
        raise
    if tensorboard is not None:
        tensorboard.start(coordinator)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    def loop() -> None:
        coordinator.run()
        done.set()  # the loop gave up (or was stopped): so does the process
    threading.Thread(target=loop, daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    coordinator.stop()
    if status is not None:
        status.stop()
    if tensorboard is not None:
        tensorboard.stop()
    server.stop(2)
    if coordinator.fatal:
        print(f"colaflow serve: {coordinator.fatal}", file=sys.stderr)
        return 1
    return 0
