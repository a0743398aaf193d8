"""gRPC servicers on grpc.aio: parse, check, call the coordinator, map exceptions to status codes. Thin.

A Work stream is a coroutine, not a thread, so thousands of devices can hold one while `Health`
and `SubmitJob` still answer at once. Every proto <-> Python conversion is `colaflow.serde`'s;
every state read is the coordinator's, under its lock (held briefly: the step runs outside it).
"""
from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import threading
import time
from pathlib import Path

import grpc

from colaflow import serde
from colaflow.errors import ColaflowError, ResourceExhausted
from colaflow.export import init_params, peft_task_type, save, save_peft
from colaflow.job import JobSpec
from colaflow.protocol import Assign, Packets
from colaflow.records import LIVE
from colaflow.tokenizer import to_files
from colaflow.v1 import control_pb2, control_pb2_grpc, worker_pb2
from colaflow.wire import MAX_MESSAGE_BYTES, SERVER_OPTIONS, add_worker_service

from .auth import Identity, Tokens
from .coordinator import Closed, Coordinator, JobStatus
from .probes import Probes
from .uploads import UploadLimits, Uploads

log = logging.getLogger("colaflow.server")
HEARTBEAT_S = 1.0
FRAME_TRIES = 3  # a packet frame that fails to encode this many times in a row fails its job
_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def _status(e: Exception) -> grpc.StatusCode:
    """One mapping from plain-Python errors to gRPC status codes."""
    if type(e) is ColaflowError:  # a request this server cannot serve as it is (e.g. no tokenizer)
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, OSError):  # e.g. the state dir is full: retry later
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


async def _identity(context, tokens: Tokens, role: str) -> Identity:
    identity = tokens.identity(context.invocation_metadata())
    if identity is None:
        # the caller knows whether it sent a token: saying which case this is tells it nothing new
        sent = dict(context.invocation_metadata() or ()).get("authorization", "").startswith("Bearer ")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{'unknown token' if sent else 'no token'}: this call needs a `{role}` token")
    if identity.role not in (role, "admin"):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"wrong role: this is a `{identity.role}` token; this call needs a `{role}` token")
    return identity


async def _worker_id(context, identity: Identity, worker_id: str) -> str:
    """The worker id, if it is well formed and this credential may use it."""
    if not _WORKER_ID.fullmatch(worker_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"`worker_id` {worker_id[:64]!r} must be 1-128 of [A-Za-z0-9._:@-]")
    if identity.role == "worker" and identity.name and worker_id != identity.name:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token is for worker {identity.name!r}")
    return worker_id


class WorkerService:
    """Register, and one Work stream per worker: a pump between gRPC and the coordinator."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, loop: asyncio.AbstractEventLoop):
        self.c, self.tokens = coordinator, tokens
        self.wakers: set[asyncio.Event] = set()
        self.frame_faults: dict[tuple[str, int], int] = {}  # (job, step) -> failed tries to frame its packets
        # the coordinator changes state on other threads: wake every stream to look for its messages
        coordinator.listeners.append(lambda: loop.call_soon_threadsafe(self._wake))

    def _wake(self) -> None:
        for event in self.wakers:
            event.set()

    async def Register(self, request, context):
        identity = await _identity(context, self.tokens, "worker")
        worker_id = await _worker_id(context, identity, request.worker_id)
        c = request.capabilities
        if len(c.accelerator) > 32 or len(c.codecs) > 16:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "`capabilities` are too long")
        caps = {"cores": c.cores, "memory": c.memory_bytes, "accelerator": c.accelerator}
        try:
            session = self.c.register(worker_id, caps, identity.credential)
        except Exception as e:
            await context.abort(_status(e), _message(e))
        log.info("worker %s registered: %s", worker_id, caps)
        return worker_pb2.RegisterResponse(session=session, heartbeat_s=HEARTBEAT_S,
                                           max_message_bytes=MAX_MESSAGE_BYTES)

    async def Work(self, request_iterator, context):
        identity = await _identity(context, self.tokens, "worker")
        worker_id = await _worker_id(context, identity, dict(context.invocation_metadata()).get("x-worker-id", ""))
        inbox = serde.Inbox("server", max_bytes=self.c.max_update_bytes())
        try:
            first = None
            async for raw in request_iterator:
                first = inbox.feed(raw)
                break
            if first is None:
                return
            if not isinstance(first, serde.Opening):
                raise ValueError(f"a Work stream opens with Hello, not {type(first).__name__}")
            stream = self.c.connect(worker_id, first.session, first.hello)
        except Exception as e:
            await context.abort(_status(e), _message(e))
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
                        await context.abort(_status(ended["error"]), _message(ended["error"]))
                    return  # the worker said goodbye or closed its side
                try:
                    msg = self.c.next_message(worker_id, stream, timeout=0)
                except Closed:
                    return
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
                codecs = self.c.codecs(msg.job) if isinstance(msg, Packets) else ("raw", "raw")
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
                        self.c.fail(msg.job, why)
                        await context.abort(grpc.StatusCode.INTERNAL, f"job {msg.job!r}: {why}")
                    if isinstance(msg, Packets):
                        self.frame_faults.pop((msg.job, msg.step), None)
                else:
                    for raw in serde.to_worker(msg, seq):
                        yield raw
                last_sent = time.monotonic()
                if isinstance(msg, Packets):
                    self.c.sent(msg.job, sent, worker_id)
                seq += 1
        finally:
            self.wakers.discard(wake)
            reader.cancel()
            self.c.disconnect(worker_id, stream, leaving=ended["leaving"])

    def _forget_ended_faults(self) -> None:
        """Drop the fault counts of jobs that ended (cancelled, say) between tries: none is sent again."""
        live = {s.job for s in self.c.statuses() if s.state in LIVE}
        for key in [k for k in self.frame_faults if k[0] not in live]:
            del self.frame_faults[key]

    async def _read(self, worker_id: str, stream: int, inbox: serde.Inbox, request_iterator, ended: dict,
                    wake: asyncio.Event) -> None:
        try:
            nbytes = 0  # of the message being reassembled
            async for raw in request_iterator:
                nbytes += len(raw)
                self.c.heard(worker_id)  # an update longer than `--reassign-after` on a slow link is not silence
                inbox.max_bytes = self.c.max_update_bytes()  # what an honest update can be, no more
                msg = inbox.feed(raw)
                if msg is None:
                    continue
                if isinstance(msg, serde.Credit):
                    self.c.grant(worker_id, stream, msg.packets)
                elif isinstance(msg, serde.Goodbye):
                    log.info("worker %s says goodbye%s: %s", worker_id, " for good" if msg.leaving else "",
                             msg.reason[:200])
                    ended["leaving"] = msg.leaving
                    return
                elif isinstance(msg, serde.Heartbeat):
                    self.c.worker_status(worker_id, stream, msg.status)
                else:
                    self.c.receive(worker_id, msg, nbytes)
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


def _status_pb(s: JobStatus) -> control_pb2.JobStatus:
    return control_pb2.JobStatus(job=s.job, state=s.state, step=s.step, steps=s.steps, versions=s.versions,
                                 loss=s.loss, error=s.error, max_staleness=s.max_staleness, workers=s.workers)


class ControlService(control_pb2_grpc.ControlServicer):
    """Jobs, scoped to the caller's tenant: another tenant's job reads as unknown; admin sees all."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, model_name: str | None = None, tokenizer=None,
                 upload_limits: UploadLimits | None = None):
        self.c, self.tokens, self.model_name, self.tokenizer = coordinator, tokens, model_name, tokenizer
        self.uploads = Uploads(upload_limits)
        self._tokenizer_files: dict[str, bytes] | None = None  # saved once, on the first GetTokenizer

    async def _call(self, context, fn, in_thread: bool = False):
        identity = await _identity(context, self.tokens, "control")
        try:
            if in_thread:  # heavy work (parsing a dataset, writing an export) stays off the event loop
                return await asyncio.to_thread(fn, identity.tenant)
            return fn(identity.tenant)
        except Exception as e:
            await context.abort(_status(e), _message(e))

    async def SubmitJob(self, request, context):
        def submit(tenant):
            spec = JobSpec.from_dict(serde.unpack(request.spec, "spec"))
            if request.upload and request.data:
                raise ValueError("pass `data` or `upload`, not both")
            data = self.uploads.claim(request.upload, tenant or "default") if request.upload else request.data
            init = init_params(spec, request.init) if request.init else None
            job = self.c.submit(spec, serde.unpack(data, "data"), request.steps, tenant or "default", init)
            return control_pb2.SubmitJobResponse(job=job)
        return await self._call(context, submit, in_thread=True)

    async def GetTokenizer(self, request, context):
        def files(tenant):
            if self.tokenizer is None:
                raise ColaflowError(f"the server's model {self.model_name!r} has no tokenizer: submit pre-tokenised "
                                    "rows (`input_ids`, `labels`) or tokenise with your own")
            if self._tokenizer_files is None:
                self._tokenizer_files = to_files(self.tokenizer)
            vocab, context = self.c.host.limits()
            return control_pb2.GetTokenizerResponse(model=self.model_name or "", max_length=context or 0,
                                                    vocab_size=vocab or 0, files=self._tokenizer_files)
        return await self._call(context, files, in_thread=True)

    async def UploadData(self, request_iterator, context):
        identity = await _identity(context, self.tokens, "control")
        upload = None
        try:
            async for r in request_iterator:
                if upload is None:
                    upload = self.uploads.begin(identity.tenant or "default", r.total_bytes)
                self.uploads.add(upload, r.data)
            if upload is None:
                raise ValueError("an upload needs at least one chunk")
            size = self.uploads.finish(upload)
        except BaseException as e:  # a refused chunk or a broken stream: its bytes are freed now
            if upload is not None:
                self.uploads.abandon(upload)
            if not isinstance(e, Exception):
                raise
            await context.abort(_status(e), _message(e))
        return control_pb2.UploadDataResponse(upload=upload, bytes=size)

    async def GetJob(self, request, context):
        return await self._call(context, lambda t: control_pb2.GetJobResponse(status=_status_pb(self.c.status(request.job, t))))

    async def ListJobs(self, request, context):
        return await self._call(context, lambda t: control_pb2.ListJobsResponse(
            jobs=[_status_pb(s) for s in self.c.statuses(t)]))

    async def CancelJob(self, request, context):
        return await self._call(context, lambda t: control_pb2.CancelJobResponse(status=_status_pb(self.c.cancel(request.job, t))))

    async def StreamMetrics(self, request, context):
        sent = request.since
        while True:
            new, ended = await self._call(context, lambda t: self.c.metrics(request.job, sent, 0.0, t))
            for m in new:
                yield control_pb2.StreamMetricsResponse(metrics=serde.pack(m))
            sent += len(new)
            if not request.follow or (ended and not new):
                return
            if not new:
                await asyncio.sleep(0.2)

    async def ExportAdapter(self, request, context):
        def files(tenant):
            e = self.c.export(request.job, tenant, request.which or "last")
            with tempfile.TemporaryDirectory() as tmp:
                if request.format in ("", "native"):
                    path = save(e.adapters, e.spec, Path(tmp) / "out", e.versions)
                elif request.format == "peft":
                    path = save_peft(e.adapters, Path(tmp) / "out", base_model=self.model_name,
                                     task_type=peft_task_type(self.c.host.model))
                else:
                    raise ValueError(f"`format` must be native or peft, got {request.format!r}")
                return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
        for name, data in (await self._call(context, files, in_thread=True)).items():
            for off in range(0, max(len(data), 1), serde.CHUNK_BYTES):
                piece = data[off:off + serde.CHUNK_BYTES]
                yield control_pb2.ExportAdapterResponse(file=name, offset=off, data=piece,
                                                        last=off + len(piece) >= len(data))

    async def ListWorkers(self, request, context):
        """Admin only: a tenant sees the workers of its own jobs in their status, never the whole fleet."""
        identity = await _identity(context, self.tokens, "control")
        if identity.role != "admin":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "wrong role: this is a `control` token; listing workers needs an `admin` token "
                                "(a job's own workers are in its status)")
        return control_pb2.ListWorkersResponse(workers=serde.pack(self.c.workers_view()))

    async def Health(self, request, context):
        """Anyone may ask whether the server serves; only a control or admin token learns the counts."""
        identity = self.tokens.identity(context.invocation_metadata())
        h = self.c.health(identity.tenant if identity is not None else None)
        if identity is None or identity.role not in ("control", "admin"):
            return control_pb2.HealthResponse(status="serving" if h.status == "serving" else "unhealthy")
        return control_pb2.HealthResponse(status=h.status, workers=h.workers, jobs=h.jobs)


class Served:
    """A grpc.aio server on its own event-loop thread, started and stopped from ordinary threads."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, address: str,
                 tls: tuple[bytes, bytes, bytes | None] | None, model_name: str | None, tokenizer=None,
                 upload_limits: UploadLimits | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="colaflow-grpc", daemon=True)
        self.thread.start()
        self.probes = Probes(coordinator)
        self._watch: asyncio.Future | None = None
        self.control = ControlService(coordinator, tokens, model_name, tokenizer, upload_limits)
        self.server, self.port = self._run(self._build(coordinator, tokens, address, tls))

    def _run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self, coordinator, tokens, address, tls):
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self.worker = WorkerService(coordinator, tokens, asyncio.get_running_loop())
        add_worker_service(server, self.worker)
        control_pb2_grpc.add_ControlServicer_to_server(self.control, server)
        self.probes.add_to(server)  # grpc.health.v1 and reflection: no token, nothing about jobs
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                key, cert, client_ca = tls
                creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                    require_client_auth=client_ca is not None)
                port = server.add_secure_port(address, creds)
        except RuntimeError:
            port = 0
        return server, port

    def start(self) -> None:
        self._run(self.probes.update())  # the first probe already tells the truth
        self._run(self.server.start())
        self._watch = asyncio.run_coroutine_threadsafe(self.probes.watch(), self.loop)

    def stop(self, grace: float | None = None) -> None:
        try:
            if self._watch is not None:
                self._watch.cancel()
                self._run(self.probes.shutdown())
            self._run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def make_server(coordinator: Coordinator, tokens: Tokens, address: str = "127.0.0.1:0",
                tls: tuple[bytes, bytes, bytes | None] | None = None,
                model_name: str | None = None, tokenizer=None,
                upload_limits: UploadLimits | None = None) -> tuple[Served, int]:
    """A gRPC server with the worker and control services, health and reflection; returns it (not
    started) and its bound port.

    `tokenizer` (the model's, or None) is what GetTokenizer hands clients; `upload_limits` bound UploadData.
    """
    served = Served(coordinator, tokens, address, tls, model_name, tokenizer, upload_limits)
    if served.port == 0:
        served.stop(0)
        raise OSError(f"cannot listen on {address}: the port is taken (another colaflow serve?) or the "
                      "address is not this machine's")
    return served, served.port
