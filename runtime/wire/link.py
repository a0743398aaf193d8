"""The client side of the Work stream: a gRPC pump around one `colaflow.Worker`.

The edge daemon and the Ray worker actor both run this one loop: register, open the Work stream,
move the Worker's messages both ways, and reconnect with exponential back-off and jitter after any
loss. All bookkeeping is the Worker's.

    link = WorkerLink("10.0.0.5:7000", Worker("laptop-1", Checkpoints("~/.colaflow-edge")), token=...)
    link.run()          # until link.stop(); returns an exit code (2: the server refused the token)
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable

import grpc

from ..checks import backoff
from ..control.protocol import Packets
from ..control.worker import Worker
from ..v1 import worker_pb2, worker_pb2_grpc
from . import serde
from .channel import channel, work_call

log = logging.getLogger("colaflow.link")
CREDITS = 32  # packet frames the server may have in flight to this worker (a step sends one per input group)


class WorkerLink:
    def __init__(self, address: str | Callable[[], str], worker: Worker, token: str | None = None,
                 tls_ca: bytes | None = None, max_backoff: float = 30.0):
        self.address = address if callable(address) else (lambda: address)
        self.worker, self.token, self.tls_ca, self.max_backoff = worker, token, tls_ca, max_backoff
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.leaving = False  # said in Goodbye: the server moves this worker's sites at once
        self.report_every = 10.0  # seconds between "N fits/s" log lines (none while idle)

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("x-worker-id", self.worker.worker_id)]
        return md + ([("authorization", f"Bearer {self.token}")] if self.token else [])

    def run(self) -> int:
        """Serve until `stop()`; reconnect after every loss. Returns the exit code."""
        attempt = 0
        while not self.stopping.is_set():
            try:
                address = self.address()
                began = time.monotonic()
                with channel(address, self.tls_ca) as ch:
                    self._session(address, worker_pb2_grpc.WorkerStub(ch), work_call(ch))
                if self.stopping.is_set() or time.monotonic() - began > 5.0:
                    attempt = 0
                    continue
                # the server ended a fresh stream at once: another worker with this id took it over?
                why = f"the server closed the stream (is another worker using the id {self.worker.worker_id!r}?)"
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
            finally:
                self.connected.clear()
            attempt += 1
            delay = backoff(attempt, self.max_backoff) * random.uniform(0.5, 1.0)  # jitter: not all at once
            log.warning("connection lost (%s); reconnecting in %.1f s", why, delay)
            self.stopping.wait(delay)
        log.info("stopped after %d fits", self.worker.fits)
        return 0

    def stop(self, leaving: bool = False) -> None:
        """Finish the current fit, say goodbye and return from `run`; `leaving`: for good."""
        self.leaving = leaving
        self.stopping.set()

    def _session(self, address: str, stub, work) -> None:
        caps = worker_pb2.Capabilities(cores=os.cpu_count() or 1, accelerator=self.worker.device,
                                       memory_bytes=_memory_bytes(), codecs=[1, 2, 3, 4, 5])
        reg = stub.Register(worker_pb2.RegisterRequest(worker_id=self.worker.worker_id, capabilities=caps),
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
        log.info("connected to %s as %s", address, self.worker.worker_id)
        self.connected.set()
        inbox, t0, fits0 = serde.Inbox("worker"), time.monotonic(), self.worker.fits
        arrived: queue.Queue = queue.Queue()  # raw frames, an exception, or None at the end

        def read() -> None:  # reads ahead while this thread fits, so fits can take what has arrived
            try:
                for raw in responses:
                    arrived.put(raw)
            except BaseException as e:
                arrived.put(e)
            arrived.put(None)
        reader = threading.Thread(target=read, daemon=True, name="colaflow-link-read")
        reader.start()
        try:
            ended = False
            while not ended:
                items = [arrived.get()]
                while not arrived.empty() and len(items) < 256:
                    items.append(arrived.get_nowait())
                msgs = []
                for raw in items:
                    if raw is None or isinstance(raw, BaseException):
                        ended = True
                        if raw is not None and not (self.stopping.is_set() and isinstance(raw, grpc.RpcError)):
                            raise raw
                        break
                    msg = inbox.feed(raw)
                    if msg is not None and not isinstance(msg, serde.Heartbeat):
                        msgs.append(msg)
                if msgs:  # fits of every frame that has arrived, one checkpoint per job
                    send(self.worker.handle_all(msgs))
                    frames = sum(isinstance(m, Packets) for m in msgs)
                    if frames:
                        outq.put(serde.credit(frames))
                send(self.worker.retry())  # the server's heartbeats wake this loop at least once a second
                if time.monotonic() - t0 > self.report_every:
                    if self.worker.fits > fits0:  # an idle daemon says nothing
                        log.info("%.1f fits/s, %d learners", (self.worker.fits - fits0) / (time.monotonic() - t0),
                                 len(self.worker.learners))
                    t0, fits0 = time.monotonic(), self.worker.fits
                if self.stopping.is_set() and not ended:
                    outq.put(serde.goodbye("leaving" if self.leaving else "stopping", self.leaving))
                    outq.put(None)
                    timer = threading.Timer(5.0, responses.cancel)  # let the goodbye reach the server
                    timer.start()
                    reader.join(10)
                    timer.cancel()
                    break
        finally:
            beat.set()
            outq.put(None)
            responses.cancel()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
