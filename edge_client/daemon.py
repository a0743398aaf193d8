"""The edge daemon: a `colaflow.Worker` with its checkpoints on this device, behind a `WorkerLink`.

    colaflow edge --server 127.0.0.1:7000 --token-file worker.token --state-dir ~/.colaflow-edge

All the bookkeeping (learners, fitted-through, replay filter, checkpoint before emit, what to
resend) is the Worker's; the gRPC pump (register, Work stream, reconnect with back-off) is the
WorkerLink's, the same one a Ray worker actor runs. This module adds the device's side: a state
dir, a stable worker id, and SIGTERM (finish the current fit, say goodbye, exit 0).
"""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from colaflow.control.checkpoints import Checkpoints
from colaflow.control.worker import Worker
from colaflow.wire.link import WorkerLink


class Daemon:
    def __init__(self, server: str, token: str | None, worker_id: str, state_dir: Path | None,
                 device: str = "cpu", tls_ca: bytes | None = None, max_backoff: float = 30.0):
        self.worker = Worker(worker_id, Checkpoints(state_dir) if state_dir is not None else None, device)
        self.link = WorkerLink(server, self.worker, token, tls_ca, max_backoff)

    def run(self) -> int:
        """Serve until SIGTERM / stop(); reconnect after every loss. Returns the exit code."""
        return self.link.run()

    def stop(self) -> None:
        self.link.stop()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def install_sigterm(daemon: Daemon) -> None:
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
