"""The worker service on grpc.aio: Register, and one Work stream per worker — a pump between gRPC
frames and the scheduler. A stream is a coroutine, not a thread, so thousands of devices can hold
one while `Health` and `SubmitJob` still answer at once; every frame <-> message conversion is
`colaflow.wire.serde`'s, every decision the scheduler's.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from colaflow.control.protocol import Assign, Packets
from colaflow.control.status import LIVE
from colaflow.job import JobSpec
from colaflow.v1 import worker_pb2
from colaflow.wire import serde
from colaflow.wire.channel import MAX_MESSAGE_BYTES

from .auth import Tokens
from .coordinator import Coordinator
from .rpc import checked_worker_id, identity, message, status_code

log = logging.getLogger("colaflow.server")
HEARTBEAT_S = 1.0
FRAME_TRIES = 3  # a packet frame that fails to encode this many times in a row fails its job
MAX_CREDIT = 1024  # packet frames one grant may add: a worker's credit bounds the server's memory for it


def _codecs(spec: JobSpec) -> tuple[str, str]:
    return spec.codec_x, spec.codec_g


class WorkerService:
    """Register, and one Work stream per worker: a pump between gRPC and the coordinator."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, loop: asyncio.AbstractEventLoop):
        self.coordinator, self.scheduler, self.tokens = coordinator, coordinator.scheduler, tokens
        self.wakers: set[asyncio.Event] = set()
        self.frame_faults: dict[tuple[str, int], int] = {}  # (job, step) -> failed tries to frame its packets
        # the scheduler changes on other threads: wake every stream to look for its messages
        self.scheduler.listen(lambda: loop.call_soon_threadsafe(self._wake))

    def _wake(self) -> None:
        for event in self.wakers:
            event.set()

    async def Register(self, request, context):
        who = await identity(context, self.tokens, "worker")
        worker_id = await checked_worker_id(context, who, request.worker_id)
        c = request.capabilities
        if len(c.accelerator) > 32 or len(c.codecs) > 16:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "`capabilities` are too long")
        caps = {"cores": c.cores, "memory": c.memory_bytes, "accelerator": c.accelerator}
        try:
            session = self.scheduler.register(worker_id, caps, who.credential)
        except Exception as e:
            await context.abort(status_code(e), message(e))
        log.info("worker %s registered: %s", worker_id, caps)
        return worker_pb2.RegisterResponse(session=session, heartbeat_s=HEARTBEAT_S,
                                           max_message_bytes=MAX_MESSAGE_BYTES)

    async def Work(self, request_iterator, context):
        who = await identity(context, self.tokens, "worker")
        worker_id = await checked_worker_id(context, who, dict(context.invocation_metadata()).get("x-worker-id", ""))
        inbox = serde.Inbox("server", max_bytes=self.scheduler.max_update_bytes())
        try:
            first = None
            async for raw in request_iterator:
                first = inbox.feed(raw)
                break
            if first is None:
                return
            if not isinstance(first, serde.Opening):
                raise ValueError(f"a Work stream opens with Hello, not {type(first).__name__}")
            stream = self.scheduler.connect(worker_id, first.session, first.hello)
            self.scheduler.heard(worker_id)
        except Exception as e:
            await context.abort(status_code(e), message(e))
        wake, ended = asyncio.Event(), {"error": None, "leaving": False}
        self.wakers.add(wake)
        reader = asyncio.create_task(self._read(worker_id, stream, inbox, request_iterator, ended, wake))
        seq, last_sent = 0, time.monotonic()
        try:
            while True:
                wake.clear()  # before looking: a change after this point wakes us again
                if reader.done():
                    if ended["error"] is not None:
                        log.warning("worker %s: %s", worker_id, ended["error"])
                        await context.abort(status_code(ended["error"]), message(ended["error"]))
                    return  # the worker said goodbye or closed its side
                if self.coordinator.stopping or not self.scheduler.current(worker_id, stream):
                    return  # the server stops, or a newer connection of this worker took over
                msg = self.scheduler.next_message(worker_id, stream)
                if msg is None:
                    idle = time.monotonic() - last_sent
                    if idle >= HEARTBEAT_S:  # wakes meant for others must not starve this stream's heartbeat
                        yield serde.heartbeat_to_worker(time.time())
                        last_sent = time.monotonic()
                        continue
                    try:
                        await asyncio.wait_for(wake.wait(), HEARTBEAT_S - idle)
                    except asyncio.TimeoutError:
                        pass
                    continue
                codecs = _codecs(self.scheduler.find(msg.job).spec) if isinstance(msg, Packets) else ("raw", "raw")
                sent = 0
                if isinstance(msg, (Packets, Assign)):  # megabytes: chunked; lossy codecs encode off the loop
                    frames = serde.to_worker(msg, seq, *codecs)
                    try:
                        async for raw in (_ahead(frames) if codecs != ("raw", "raw") else _now(frames)):
                            yield raw
                            sent += len(raw)
                    except Exception as e:
                        if not isinstance(msg, Packets):
                            raise
                        why = f"step {msg.step}'s packets cannot be sent: {type(e).__name__}: {e}"
                        key = (msg.job, msg.step)
                        self.frame_faults[key] = tries = self.frame_faults.get(key, 0) + 1
                        self._forget_ended_faults()
                        if tries < FRAME_TRIES:  # perhaps passing (memory): the worker reconnects and is sent it again
                            log.warning("job %s: %s (try %d of %d)", msg.job, why, tries, FRAME_TRIES)
                            await context.abort(grpc.StatusCode.UNAVAILABLE, f"job {msg.job!r}: {why}")
                        del self.frame_faults[key]  # every resend fails alike: end the job, not loop
                        log.error("job %s: %s", msg.job, why)
                        self.scheduler.fail(msg.job, why)
                        await context.abort(grpc.StatusCode.INTERNAL, f"job {msg.job!r}: {why}")
                    if isinstance(msg, Packets):
                        self.frame_faults.pop((msg.job, msg.step), None)
                else:
                    for raw in serde.to_worker(msg, seq):
                        yield raw
                last_sent = time.monotonic()
                if isinstance(msg, Packets):
                    self.scheduler.count_bytes(msg.job, worker_id, sent=sent)
                seq += 1
        finally:
            self.wakers.discard(wake)
            reader.cancel()
            self.scheduler.disconnect(worker_id, stream, leaving=ended["leaving"])

    def _forget_ended_faults(self) -> None:
        """Drop the fault counts of jobs that ended (cancelled, say) between tries: none is sent again."""
        live = {s.job for s in self.scheduler.statuses() if s.state in LIVE}
        for key in [k for k in self.frame_faults if k[0] not in live]:
            del self.frame_faults[key]

    async def _read(self, worker_id: str, stream: int, inbox: serde.Inbox, request_iterator, ended: dict,
                    wake: asyncio.Event) -> None:
        try:
            nbytes = 0  # of the message being reassembled
            async for raw in request_iterator:
                nbytes += len(raw)
                # an update longer than `--reassign-after` on a slow link is not silence
                self.scheduler.heard(worker_id)
                inbox.max_bytes = self.scheduler.max_update_bytes()  # what an honest update can be, no more
                msg = inbox.feed(raw)
                if msg is None:
                    continue
                if isinstance(msg, serde.Credit):
                    self.scheduler.grant(worker_id, stream, min(msg.packets, MAX_CREDIT))
                elif isinstance(msg, serde.Goodbye):
                    log.info("worker %s says goodbye%s: %s", worker_id, " for good" if msg.leaving else "",
                             msg.reason[:200])
                    ended["leaving"] = msg.leaving
                    return
                elif isinstance(msg, serde.Heartbeat):
                    self.scheduler.worker_status(worker_id, stream, msg.status)
                else:
                    self.scheduler.receive(worker_id, msg)
                    self.scheduler.count_bytes(msg.job, worker_id, received=nbytes)
                nbytes = 0
        except Exception as e:  # a bad frame ends this stream with a status; other workers go on
            ended["error"] = e
        finally:
            wake.set()


async def _ahead(chunks):
    """The chunks of `chunks` (an iterator that encodes and frames), each made on a thread while
    the previous one is written: a lossy codec's kernels (milliseconds a chunk, without the GIL)
    overlap the send and leave the event loop free for other streams."""
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
    try:
        while (raw := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
            yield raw
    finally:  # a stream closed mid-frame: the chunk being framed is dropped, and so is its error
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _now(chunks):
    """The chunks of a raw frame, made on the event loop: each is one copy into a message, which
    holds the GIL wherever it runs, and a thread hop per chunk cost ~14 % of the throughput."""
    for raw in chunks:
        yield raw
