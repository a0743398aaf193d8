"""A running colaflow server in this process: the model on its device, the coordinator and its step
thread, the gRPC services, the status page. `colaflow serve` runs one; so does the Ray server actor
(`colaflow.server.ray`), in the actor's own process.

    serving = Serving(args, say=print)     # args: `colaflow serve`'s options (colaflow.server.cli.parse)
    serving.address                        # "HOST:PORT"
    serving.done.wait()                    # set when the step loop gives up (or `stop` is called)
    code = serving.stop()                  # 1 if the step loop gave up, else 0
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable

import torch

from colaflow.control.retention import Policy
from colaflow.engine.classify import classifier
from colaflow.engine.host import Host
from colaflow.engine.loss import seq_cls
from colaflow.engine.memory import parse_bytes
from colaflow.engine.weights import describe
from colaflow.errors import ColaflowError
from colaflow.models import check_device, load, tiny
from colaflow.wire.channel import tune_allocator

from .auth import Tokens
from .coordinator import Coordinator
from .dirstore import DirStore
from .service import make_server
from .status import StatusServer
from .uploads import UploadLimits

log = logging.getLogger("colaflow.server")
STOP_STEP_S = 30.0  # the step under way gets this long to end before the process exits under it


class Serving:
    def __init__(self, args: argparse.Namespace, say: Callable[[str], None] = log.info):
        """Check the options (a bad one raises SystemExit, saying which, before the model loads), load the
        model, start the services and the step loop; `say` hears "listening on" and the page's address."""
        if args.threads:
            torch.set_num_threads(args.threads)
        tls, tokens = _security(args)
        _check_device(args.device)  # before the model loads: a minute of loading, then a CUDA assertion
        tune_allocator()
        if args.port:
            _check_port_free(args.host, args.port)  # before the model loads: fail in a second, not a minute
        if isinstance(args.http_port, int) and args.http_port:
            _check_port_free(args.host, args.http_port, "--http-port, or --http-port off")
        self.tensorboard = None
        if args.tensorboard:
            from .tblog import TensorBoardLog  # needs the optional `tensorboard` package

            self.tensorboard = TensorBoardLog.check(args.tensorboard)  # a missing package fails now, clearly
        for flag, value in (("--mix-rows", args.mix_rows), ("--max-tenant-jobs", args.max_tenant_jobs),
                            ("--max-upload-mb", args.max_upload_mb)):
            if value < 1:
                raise SystemExit(f"colaflow serve: {flag} must be >= 1, got {value}")
        policy = _policy(args)
        _raise_descriptor_limit()
        store = DirStore(args.state_dir) if args.state_dir else None
        host, tokenizer = _host(args)
        held = describe(host.model)
        log.info("model %s: %s weights, quantization %s, on %s, %.2f GiB resident", args.model, held["dtype"],
                 held["quantization"], ", ".join(held["devices"]), held["resident_bytes"] / 2**30)
        self.coordinator = Coordinator(host, reassign_after=args.reassign_after, store=store, mix=args.mix,
                                       layered=args.layered, max_tenant_jobs=args.max_tenant_jobs, policy=policy)
        mb = args.max_upload_mb << 20
        limits = UploadLimits(max_bytes=mb, max_total=4 * mb, max_per_tenant=2 * mb)
        try:
            self.served, self.port = make_server(self.coordinator, tokens, f"{args.host}:{args.port}", tls,
                                                 model_name=args.model, tokenizer=tokenizer, upload_limits=limits)
        except OSError as e:
            raise SystemExit(f"colaflow serve: {e}") from None
        self.served.start()
        self.address = f"{args.host}:{self.port}"
        say(f"colaflow serve: listening on {self.address}")
        try:
            self.status = _status_page(args, self.coordinator, tokens, self.port)
        except SystemExit:
            self.served.stop(0)
            raise
        if self.status is not None:
            say(f"colaflow serve: status page at {self.status.url}")
        if self.tensorboard is not None:
            self.tensorboard.start(self.coordinator)
        self.done = threading.Event()
        self.loop = threading.Thread(target=self._loop, name="colaflow-step", daemon=True)
        self.loop.start()

    def _loop(self) -> None:
        self.coordinator.run()
        self.done.set()  # the loop gave up (or was stopped): so does the process

    def stop(self, why: str = "") -> int:
        """Stop the step loop — the step under way ends (a layered wait is abandoned) — then the page and
        the services, saying so; 1 if the step loop had given up, else 0. The loop is joined: a step
        still computing while the interpreter exits aborts it ("terminate called without an active
        exception", exit status -6)."""
        start = time.monotonic()
        log.info("colaflow serve: stopping%s: the step under way ends, then the services close",
                 f" ({why})" if why else "")
        self.coordinator.stop()
        self.loop.join(STOP_STEP_S)
        if self.loop.is_alive():
            log.warning("colaflow serve: the step under way did not end within %.0f s; exiting anyway", STOP_STEP_S)
        if self.status is not None:
            self.status.stop()
        if self.tensorboard is not None:
            self.tensorboard.stop()
        self.served.stop(1)  # in-flight calls get a second; workers' streams end and they reconnect elsewhere
        self.done.set()
        log.info("colaflow serve: stopped in %.1f s", time.monotonic() - start)
        if self.coordinator.fatal:
            log.critical("colaflow serve: %s", self.coordinator.fatal)
            return 1
        return 0


def _policy(args: argparse.Namespace) -> Policy:
    """How long ended jobs are kept and the tenants' state-dir quota, from --keep-ended* and --tenant-disk-mb."""
    for flag, value in (("--keep-ended", args.keep_ended), ("--keep-ended-days", args.keep_ended_days),
                        ("--tenant-disk-mb", args.tenant_disk_mb)):
        if value < 0:
            raise SystemExit(f"colaflow serve: {flag} must be >= 0, got {value}")
    return Policy(keep=args.keep_ended, max_age_s=args.keep_ended_days * 86400.0,
                  tenant_bytes=(args.tenant_disk_mb << 20) or None)


def _raise_descriptor_limit() -> None:
    """Take the hard limit on open files as the soft one (as Go and nginx do): every gRPC connection
    and status-page request holds a descriptor, and the page takes at most an eighth of them."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 1 << 16) if hard != resource.RLIM_INFINITY else 1 << 16
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as e:
        log.debug("could not raise the open-file limit: %s", e)


def _security(args: argparse.Namespace) -> tuple[tuple | None, Tokens]:
    """The TLS material and tokens; refuses a non-loopback address without both unless --insecure."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("colaflow serve: --tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        ca = _read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
        tls = (_read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"), ca)
        _check_key_pair(args.tls_cert, args.tls_key)
    if args.tokens:
        _read(args.tokens, "--tokens")
    tokens = Tokens.load(args.tokens)
    if not _loopback(args.host) and not (tls and tokens.enabled):
        missing = " and ".join(x for x, ok in (("TLS (--tls-cert/--tls-key)", tls),
                                               ("tokens (--tokens)", tokens.enabled))
                               if not ok)
        if not args.insecure:
            raise SystemExit(f"colaflow serve: {args.host} is not a loopback address and the server has no "
                             f"{missing}: anyone who reaches it could act as admin. Add them, or pass --insecure.")
        log.warning("serving %s without %s (--insecure)", args.host, missing)
    return tls, tokens


def _host(args: argparse.Namespace) -> tuple[Host, object]:
    """The host of the model `--model` names, as --dtype/--quantize/--device-map hold it, and its
    tokenizer (what GetTokenizer hands clients; None: none)."""
    try:
        budget = parse_bytes(args.max_memory) if args.max_memory else None
        device_map = json.loads(args.device_map) if args.device_map and args.device_map.startswith("{") \
            else args.device_map
    except (ValueError, ColaflowError) as e:
        raise SystemExit(f"colaflow serve: {e}") from None
    model, tokenizer = load_model(args.model, dtype=args.dtype, quantize=args.quantize, device_map=device_map,
                                  device=args.device, offload_dir=args.offload_dir)
    placed = device_map is not None or args.quantize is not None  # (already where it computes)
    memory = {"checkpointing": True if args.checkpointing else "auto", "max_memory": budget}
    if args.classes:
        body = classifier(model, args.classes, args.pooling)
        host = Host(body if placed else body.to(args.device), seq_cls, mix_rows=args.mix_rows, **memory)
    else:
        if getattr(model, "get_output_embeddings", lambda: None)() is None:  # e.g. an encoder (AutoModel)
            raise SystemExit(f"colaflow serve: {args.model!r} ({type(model).__name__}) has no language-model head to "
                             "train against: serve it for sequence classification with --classes N")
        host = Host(model if placed else model.to(args.device), mix_rows=args.mix_rows, **memory)
    return host, tokenizer


def _status_page(args: argparse.Namespace, coordinator: Coordinator, tokens: Tokens, grpc_port: int):
    """Start the HTTP status page, /metrics and JSON API (None with `--http-port off`)."""
    if args.http_port == "off":
        return None
    port = args.http_port
    if port is None:  # the default: next to the gRPC port when that one is free, else any free port
        port = grpc_port + 1 if args.port and grpc_port < 65535 and _port_free(args.host, grpc_port + 1) else 0
    files = (args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        return StatusServer(coordinator, tokens, args.host, port, files).start()
    except OSError as e:
        raise SystemExit(f"colaflow serve: cannot serve the status page on {args.host}:{port}: "
                         f"{e.strerror or e} (pick another --http-port, or --http-port off)") from None


def _port_free(host: str, port: int) -> bool:
    try:
        _check_port_free(host, port)
        return True
    except SystemExit:
        return False


def load_model(name: str, **options):
    """(model, tokenizer); tiny-* models have no tokenizer (None); `options`: `colaflow.models.load`'s."""
    if name.startswith("tiny-"):
        if options.get("quantize") or options.get("device_map"):
            raise SystemExit(f"colaflow serve: {name} is a tiny random model held as it is built: "
                             "--quantize and --device-map are for checkpoints (an HF directory or a GGUF file)")
        dtype = options.get("dtype")
        model = tiny(name[len("tiny-"):])
        return (model.to(getattr(torch, dtype)) if dtype and dtype != "auto" else model), None
    return load(name, **options)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_device(device: str) -> None:
    """`--device` refused before anything loads where this torch cannot use it, saying what to install."""
    try:
        check_device(device)
    except (ValueError, ColaflowError) as e:
        raise SystemExit(f"colaflow serve: --device {device}: {e}") from None


def _check_port_free(host: str, port: int, flag: str = "--port") -> None:
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
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise SystemExit(f"colaflow serve: --tls-cert {cert!r} and --tls-key {key!r} are not a PEM certificate and "
                         f"its private key ({e.reason or e}): swapped, or another pair?") from None
