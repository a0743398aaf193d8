"""`colaflow edge`: the worker daemon for laptops, Jetsons and small cloud nodes.

    colaflow edge --server 10.0.0.5:7000 --token-file worker.token --state-dir ~/.colaflow-edge
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("edge", help="run a worker daemon that fits adapters for a server")
    p.add_argument("--server", required=True, help="HOST:PORT of the colaflow server")
    p.add_argument("--token-file", help="file holding this worker's bearer token")
    p.add_argument("--tls-ca", help="CA certificate that signed the server's certificate")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="where the adapters fit")
    p.add_argument("--state-dir", help="checkpoints live here; a restarted daemon resumes from them (default: "
                   "none kept: a restarted daemon starts afresh, and the server moves its sites)")
    p.add_argument("--worker-id", help="stable id (default: kept in the state dir, else the host name)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for fitting (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    from colaflow.cli._control import UsageError, checked_address

    try:
        checked_address(args.server, "--server")
    except UsageError as e:
        raise SystemExit(f"colaflow edge: error: {e}") from None
    import torch

    from .daemon import Daemon, install_sigterm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from colaflow.wire.channel import tune_allocator

    tune_allocator()
    state = Path(args.state_dir).expanduser() if args.state_dir else None
    worker_id = args.worker_id or _stable_id(state)
    token = _read(args.token_file, "--token-file").decode().strip() if args.token_file else None
    ca = _read(args.tls_ca, "--tls-ca") if args.tls_ca else None
    if hasattr(signal, "SIGXFSZ"):  # a quota'd disk makes checkpoint writes fail (and retry), not the daemon die
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    daemon = Daemon(args.server, token, worker_id, state, args.device, ca)
    install_sigterm(daemon)
    return daemon.run()


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"colaflow edge: cannot read {flag} {path!r}: {e.strerror}") from None


def _stable_id(state: Path | None) -> str:
    if state is None:
        return socket.gethostname()
    f = state / "worker_id"
    if not f.exists():
        import secrets

        state.mkdir(parents=True, exist_ok=True)
        f.write_text(f"{socket.gethostname()}-{secrets.token_hex(4)}")
    return f.read_text().strip()
