"""`colaflow serve`: the adaptation server (model host + worker and control gRPC services). It lives
with the service it starts (`colaflow.server.app.Serving`); `colaflow.cli.main` names it.

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


def add_parser(sub) -> None:
    add_options(sub.add_parser("serve", help="run the adaptation server"))


def parse(argv: list[str]) -> argparse.Namespace:
    """`colaflow serve`'s options from a command line (the Ray server actor builds its own so)."""
    p = argparse.ArgumentParser(prog="colaflow serve")
    add_options(p)
    return p.parse_args(argv)


def add_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                   help="the frozen weights' precision (default: float32 on a CPU, the checkpoint's own on a GPU); "
                        "adapters stay float32")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="hold the frozen weights quantized (bitsandbytes: nf4 as QLoRA, or int8)")
    p.add_argument("--device-map", default=None, metavar="auto|JSON",
                   help="spread the model over devices (accelerate): `auto`, or a JSON map {module: device, "
                        "\"cpu\" or \"disk\"}; what does not fit goes to the CPU or to --offload-dir")
    p.add_argument("--offload-dir", default=None, help="where --device-map's `disk` layers live")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute activations in the backward for every step (by default only for the jobs "
                        "whose steps would not fit --max-memory otherwise)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="the memory this server may use, e.g. 20GiB (default: its device's); a job whose step "
                        "and packets cannot fit is refused at submit, saying what would")
    p.add_argument("--classes", type=int, default=0,
                   help="serve sequence-classification jobs with N classes (colaflow.classifier: frozen body, "
                        "pooling, a head every job trains on its devices); rows carry `label`")
    p.add_argument("--pooling", choices=["last", "mean", "cls"], help="with --classes (default: by architecture)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: torch's default)")
    p.add_argument("--max-tenant-jobs", type=int, default=32,
                   help="live (waiting or running) jobs one tenant may hold; each holds server memory")
    p.add_argument("--keep-ended", type=int, default=100, metavar="N",
                   help="ended jobs kept per tenant (status, logs, export); past N the oldest are deleted")
    p.add_argument("--keep-ended-days", type=float, default=7.0, metavar="DAYS",
                   help="an ended job is deleted this long after it ended (0: at once; `colaflow delete JOB` "
                        "deletes one earlier)")
    p.add_argument("--tenant-disk-mb", type=int, default=2048, metavar="MB",
                   help="state-dir MiB one tenant's jobs may hold: a submit past it is refused (0: no quota)")
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


def run(args: argparse.Namespace) -> int:
    from .app import Serving  # the model and the services load only when the command runs

    logging.basicConfig(level=os.environ.get("COLAFLOW_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serving = Serving(args, say=lambda line: print(line, flush=True))
    why = []
    signal.signal(signal.SIGTERM, lambda *_: (why.append("SIGTERM"), serving.done.set()))
    try:
        serving.done.wait()
    except KeyboardInterrupt:
        why.append("Ctrl-C")
    code = serving.stop(why[0] if why else "its step loop gave up")
    if code:
        print(f"colaflow serve: {serving.coordinator.fatal}", file=sys.stderr)
    return code
