"""The edge daemon: register, stream packets in, fit with `colaflow.gl.Learner`, stream updates out.

    colaflow edge --server 127.0.0.1:7000 --token-file worker.token --state-dir ~/.colaflow-edge

Every fit is checkpointed (adapter, optimizer, version) before its update is sent, so a daemon
killed at any moment restarts from its state dir and the server replays the packets it lacks.
On any network loss it reconnects with exponential back-off and jitter; SIGTERM finishes the
current fit, checkpoints, says goodbye and exits.
"""
from __future__ import annotations

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

from colaflow import checkpoint, serde
from colaflow.adapters import load_params
from colaflow.gl import Learner
from colaflow.job import JobSpec
from colaflow.sites import Site
from colaflow.v1 import worker_pb2, worker_pb2_grpc
from colaflow.wire import CHANNEL_OPTIONS, work_call

log = logging.getLogger("colaflow.edge")
CREDITS = 4  # packet frames the server may have in flight to this worker
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Daemon:
    def __init__(self, server: str, token: str | None, worker_id: str, state_dir: Path | None,
                 device: str = "cpu", tls_ca: bytes | None = None, max_backoff: float = 30.0):
        self.server, self.token, self.worker_id = server, token, worker_id
        self.state_dir, self.device, self.tls_ca = state_dir, device, tls_ca
        self.max_backoff = max_backoff
        self.learners: dict[tuple[str, str], Learner] = {}
        self.fitted: dict[tuple[str, str], int] = {}  # last step folded into each learner's version
        self.stopping = threading.Event()
        self.fits = 0
        self._restore()

    # state

    def _restore(self) -> None:
        if self.state_dir is None:
            return
        for state in checkpoint.load_all(self.state_dir):
            spec, site = JobSpec.from_dict(state["spec"]), Site.from_dict(state["site"])
            learner = Learner(spec, site, self.device)
            learner.load_state_dict(state["learner"])
            key = (spec.job_id, site.name)
            self.learners[key], self.fitted[key] = learner, state["fitted_through"]
        if self.learners:
            log.info("restored %d learners from %s", len(self.learners), self.state_dir)

    def progress(self) -> list[worker_pb2.SiteProgress]:
        return [worker_pb2.SiteProgress(job=j, site=s, version=l.version, fitted_through=self.fitted[(j, s)])
                for (j, s), l in self.learners.items()]

    # connection

    def _channel(self) -> grpc.Channel:
        if self.tls_ca is not None:
            return grpc.secure_channel(self.server, grpc.ssl_channel_credentials(self.tls_ca), options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.server, options=CHANNEL_OPTIONS)

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("x-worker-id", self.worker_id)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    def run(self) -> int:
        """Serve until SIGTERM / stop(); reconnect after every loss. Returns the exit code."""
        attempt = 0
        while not self.stopping.is_set():
            try:
                with self._channel() as channel:
                    self._session(worker_pb2_grpc.WorkerStub(channel), work_call(channel))
                attempt = 0
            except grpc.RpcError as e:
                if e.code() in FATAL:
                    log.error("server refused this worker: %s %s", e.code().name, e.details())
                    return 2
                attempt += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                log.warning("connection lost (%s: %s); reconnecting in %.1f s", e.code().name, e.details(), delay)
                self.stopping.wait(delay)
        log.info("stopped after %d fits", self.fits)
        return 0

    def _session(self, stub, work) -> None:
        caps = worker_pb2.Capabilities(cores=os.cpu_count() or 1, accelerator=self.device,
                                       memory_bytes=_memory_bytes(), codecs=[1, 2, 3, 4])
        reg = stub.Register(worker_pb2.RegisterRequest(worker_id=self.worker_id, capabilities=caps),
                            metadata=self._metadata(), timeout=30)
        outq: queue.Queue = queue.Queue()
        send = lambda **kw: outq.put(serde.frame_message(worker_pb2.WorkerMessage(**kw)))  # noqa: E731
        send(hello=worker_pb2.Hello(session=reg.session, progress=self.progress()))
        for key, learner in self.learners.items():  # the server may lack it (lost, or restarted)
            if learner.version > 0:
                self._send_update(outq, (learner.current(), self.fitted[key]))
        send(credit=worker_pb2.Credit(packets=CREDITS))
        beat = threading.Event()

        def heartbeats():  # lets the server (and any proxy between) see a live, idle worker
            while not beat.wait(reg.heartbeat_s or 5.0):
                send(heartbeat=worker_pb2.Heartbeat(time=time.time()))
        threading.Thread(target=heartbeats, daemon=True).start()

        def requests():
            while True:
                msg = outq.get()
                if msg is None:
                    return
                yield msg
        responses = work(requests(), metadata=self._metadata())
        log.info("connected to %s as %s", self.server, self.worker_id)
        packets = serde.Reassembler()
        t0, fits0 = time.monotonic(), self.fits
        try:
            for raw in responses:
                msg, payload = serde.parse_message(raw, worker_pb2.ServerMessage)
                kind = msg.WhichOneof("kind")
                if kind == "packet":
                    whole = packets.feed(msg.packet, payload)
                    if whole is not None:
                        self._on_packets(serde.packets_from_proto(worker_pb2.PacketFrame.FromString(whole[0]), whole[1]), outq)
                        send(credit=worker_pb2.Credit(packets=1))
                elif kind == "assignment":
                    self._on_assignment(msg.assignment)
                elif kind == "ack":
                    pass  # updates are full state: on reconnect the newest is sent again anyway
                elif kind == "revocation":
                    for site in msg.revocation.sites:
                        self.learners.pop((msg.revocation.job, site), None)
                    if self.state_dir is not None and not any(j == msg.revocation.job for j, _ in self.learners):
                        checkpoint.remove(self.state_dir, msg.revocation.job)
                    log.info("job %s: %d sites revoked (%s)", msg.revocation.job, len(msg.revocation.sites),
                             msg.revocation.reason)
                if time.monotonic() - t0 > 10:
                    log.info("%.1f fits/s, %d learners", (self.fits - fits0) / (time.monotonic() - t0), len(self.learners))
                    t0, fits0 = time.monotonic(), self.fits
                if self.stopping.is_set():
                    send(goodbye=worker_pb2.Goodbye(reason="SIGTERM"))
                    outq.put(None)
                    # let the goodbye reach the server: it ends the stream; cancel only if it does not
                    timer = threading.Timer(5.0, responses.cancel)
                    timer.start()
                    for _ in responses:
                        pass
                    timer.cancel()
                    break
        finally:
            beat.set()
            outq.put(None)
            responses.cancel()

    def _on_assignment(self, a: worker_pb2.Assignment) -> None:
        spec = JobSpec.from_dict(serde.unpack(a.spec, "spec"))
        for info in a.sites:
            site = Site.from_dict(serde.unpack(info.site, "site"))
            key = (a.job, site.name)
            have = self.learners.get(key)
            if have is not None and have.version >= info.version:
                continue  # our checkpoint is as new or newer: keep its optimizer state
            learner = Learner(spec, site, self.device)
            if info.version > 0:
                load_params(learner.adapter, serde.params_from_proto(info.params))
                learner.version = info.version
                log.warning("job %s site %s: starting from the server's v%d with a fresh optimizer",
                            a.job, site.name, info.version)
            self.learners[key] = learner
            self.fitted[key] = info.version * spec.fit_interval - 1
        log.info("assigned job %s: %d sites", a.job, len(a.sites))

    def _on_packets(self, packets: list, outq: queue.Queue) -> None:
        """Fit what the frame completes; checkpoint the job once; then send the updates."""
        done = []
        for p in packets:
            key = (p.job, p.site)
            learner = self.learners.get(key)
            if learner is None or p.step <= self.fitted[key] + len(learner.buffer):
                continue  # not ours (revoked), or a replay of something already folded in
            update = learner.consume(p)
            if update is not None:
                self.fits += 1
                self.fitted[key] = p.step
                done.append((update, p.step))
        if not done:
            return
        if self.state_dir is not None:
            job = done[0][0].job
            mine = {s: l for (j, s), l in self.learners.items() if j == job}
            try:
                checkpoint.save_job(self.state_dir, job, mine, {s: self.fitted[(job, s)] for s in mine})
            except OSError as e:  # e.g. a full disk: keep training, say so loudly
                log.error("checkpoint of job %s failed: %s", job, e)
        for update, step in done:
            self._send_update(outq, (update, step))

    def _send_update(self, outq: queue.Queue, pending: tuple) -> None:
        frame, parts = serde.update_to_proto(*pending)
        for message in serde.to_chunks(frame, parts, frame.version, lambda c: worker_pb2.WorkerMessage(update=c)):
            outq.put(message)

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
