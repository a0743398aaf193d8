"""The edge daemon: a gRPC stream pump around `colaflow.worker.Worker`.

    colaflow edge --server 127.0.0.1:7000 --token-file worker.token --state-dir ~/.colaflow-edge

All the bookkeeping (learners, fitted-through, replay filter, checkpoint before emit, what to
resend) is the Worker's; this module registers, opens the Work stream, moves messages both ways,
and reconnects with exponential back-off and jitter after any loss. SIGTERM finishes the current
fit, says goodbye and exits 0.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
from pathlib import Path

import grpc

from colaflow import serde
from colaflow.checkpoint import Checkpoints
from colaflow.protocol import Packets
from colaflow.v1 import worker_pb2, worker_pb2_grpc
from colaflow.wire import CHANNEL_OPTIONS, work_call
from colaflow.worker import Worker

log = logging.getLogger("colaflow.edge")
CREDITS = 4  # packet frames the server may have in flight to this worker


class Daemon:
    def __init__(self, server: str, token: str | None, worker_id: str, state_dir: Path | None,
                 device: str = "cpu", tls_ca: bytes | None = None, max_backoff: float = 30.0):
        self.server, self.token, self.worker_id, self.tls_ca = server, token, worker_id, tls_ca
        self.max_backoff = max_backoff
        self.worker = Worker(worker_id, Checkpoints(state_dir) if state_dir is not None else None, device)
        self.stopping = threading.Event()

    def _metadata(self) -> list[tuple[str, str]]:
        return [("x-worker-id", self.worker_id)] + ([("authorization", f"Bearer {self.token}")] if self.token else [])

    def run(self) -> int:
        """Serve until SIGTERM / stop(); reconnect after every loss. Returns the exit code."""
        attempt = 0
        while not self.stopping.is_set():
            creds = grpc.ssl_channel_credentials(self.tls_ca) if self.tls_ca is not None else None
            channel = (grpc.secure_channel(self.server, creds, options=CHANNEL_OPTIONS) if creds
                       else grpc.insecure_channel(self.server, options=CHANNEL_OPTIONS))
            try:
                with channel:
                    self._session(worker_pb2_grpc.WorkerStub(channel), work_call(channel))
                attempt = 0
                continue
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED or "needs a `worker` token" in (e.details() or ""):
                    log.error("server refused this worker's token: %s %s", e.code().name, e.details())
                    return 2
                why = f"{e.code().name}: {e.details()}"
            except ValueError as e:  # a frame we cannot decode: start over, the server replays
                why = f"bad frame from the server: {e}"
            except Exception as e:  # a bug here must not take the device's other jobs down for good
                log.exception("worker error")
                why = f"{type(e).__name__}: {e}"
            attempt += 1
            delay = min(self.max_backoff, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            log.warning("connection lost (%s); reconnecting in %.1f s", why, delay)
            self.stopping.wait(delay)
        log.info("stopped after %d fits", self.worker.fits)
        return 0

    def _session(self, stub, work) -> None:
        caps = worker_pb2.Capabilities(cores=os.cpu_count() or 1, accelerator=self.worker.device,
                                       memory_bytes=_memory_bytes(), codecs=[1, 2, 3, 4])
        reg = stub.Register(worker_pb2.RegisterRequest(worker_id=self.worker_id, capabilities=caps),
                            metadata=self._metadata(), timeout=30)
        outq: queue.Queue = queue.Queue()
        seq = itertools.count()

        def send(msgs) -> None:
            for m in msgs:
                for raw in serde.to_server(m, next(seq)):
                    outq.put(raw)

        outq.put(serde.opening(reg.session, self.worker.hello()))
        send(self.worker.resend())  # everything the server has not acknowledged, oldest first
        outq.put(serde.credit(CREDITS))
        beat = threading.Event()

        def heartbeats():  # lets the server (and any proxy between) see a live, idle worker
            while not beat.wait(reg.heartbeat_s or 5.0):
                outq.put(serde.heartbeat_to_server(time.time(), self.worker.failure))
        threading.Thread(target=heartbeats, daemon=True).start()
        responses = work(iter(outq.get, None), metadata=self._metadata())
        log.info("connected to %s as %s", self.server, self.worker_id)
        inbox, t0, fits0 = serde.Inbox("worker"), time.monotonic(), self.worker.fits
        try:
            for raw in responses:
                msg = inbox.feed(raw)
                if msg is not None and not isinstance(msg, serde.Heartbeat):
                    send(self.worker.handle(msg))
                    if isinstance(msg, Packets):
                        outq.put(serde.credit(1))
                send(self.worker.retry())  # the server's heartbeats wake this loop at least once a second
                if time.monotonic() - t0 > 10:
                    log.info("%.1f fits/s, %d learners", (self.worker.fits - fits0) / (time.monotonic() - t0),
                             len(self.worker.learners))
                    t0, fits0 = time.monotonic(), self.worker.fits
                if self.stopping.is_set():
                    outq.put(serde.goodbye("SIGTERM"))
                    outq.put(None)
                    timer = threading.Timer(5.0, responses.cancel)  # let the goodbye reach the server
                    timer.start()
                    for _ in responses:
                        pass
                    timer.cancel()
                    break
        finally:
            beat.set()
            outq.put(None)
            responses.cancel()

    def stop(self) -> None:
        self.stopping.set()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def install_sigterm(daemon: Daemon) -> None:
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
