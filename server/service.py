"""gRPC servicers: parse, check, call the coordinator, map exceptions to status codes. Thin.

Every proto <-> Python conversion is `colaflow.serde`'s; every state read is the coordinator's,
under its lock.
"""
from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from pathlib import Path

import grpc

from colaflow import serde
from colaflow.export import peft_task_type, save, save_peft
from colaflow.job import JobSpec
from colaflow.protocol import Packets
from colaflow.v1 import control_pb2, control_pb2_grpc, worker_pb2
from colaflow.wire import MAX_MESSAGE_BYTES, SERVER_OPTIONS, add_worker_service

from .auth import Tokens
from .coordinator import Closed, Coordinator, JobStatus

log = logging.getLogger("colaflow.server")
HEARTBEAT_S = 1.0


def _status(e: Exception) -> grpc.StatusCode:
    """One mapping from plain-Python errors to gRPC status codes."""
    if isinstance(e, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, OSError):  # e.g. the state dir is full: retry later
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _guard(context, tokens: Tokens, role: str) -> None:
    if not tokens.allows(context.invocation_metadata(), role):
        context.abort(grpc.StatusCode.UNAUTHENTICATED if tokens.role(context.invocation_metadata()) is None
                      else grpc.StatusCode.PERMISSION_DENIED, f"this call needs a `{role}` token")


class WorkerService:
    """Register, and one Work stream per worker: a pump between gRPC and the coordinator."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens):
        self.c, self.tokens = coordinator, tokens

    def Register(self, request, context):
        _guard(context, self.tokens, "worker")
        if not request.worker_id or len(request.worker_id) > 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"`worker_id` {request.worker_id!r} must be 1-128 chars")
        caps = {"cores": request.capabilities.cores, "memory": request.capabilities.memory_bytes,
                "accelerator": request.capabilities.accelerator}
        session = self.c.register(request.worker_id, caps)
        log.info("worker %s registered: %s", request.worker_id, caps)
        return worker_pb2.RegisterResponse(session=session, heartbeat_s=HEARTBEAT_S,
                                           max_message_bytes=MAX_MESSAGE_BYTES)

    def Work(self, request_iterator, context):
        _guard(context, self.tokens, "worker")
        worker_id = dict(context.invocation_metadata()).get("x-worker-id", "")
        inbox = serde.Inbox("server", max_bytes=MAX_MESSAGE_BYTES)
        try:
            first = inbox.feed(next(request_iterator))
            if not isinstance(first, serde.Opening):
                raise ValueError(f"a Work stream opens with Hello, not {type(first).__name__}")
            stream = self.c.connect(worker_id, first.session, first.hello)
        except StopIteration:
            return
        except Exception as e:
            context.abort(_status(e), _message(e))
        errors: queue.Queue = queue.Queue()
        leaving = threading.Event()
        reader = threading.Thread(target=self._read, args=(worker_id, stream, inbox, request_iterator, errors, leaving),
                                  daemon=True)
        reader.start()
        seq, idle_since = 0, time.monotonic()
        try:
            while context.is_active():
                if not errors.empty():
                    e = errors.get()
                    if e is None:
                        return  # the worker said goodbye or closed its side
                    log.warning("worker %s: %s", worker_id, e)
                    context.abort(_status(e), _message(e))
                try:
                    msg = self.c.next_message(worker_id, stream, timeout=0.2)
                except Closed:
                    return
                if msg is None:
                    if time.monotonic() - idle_since >= HEARTBEAT_S:
                        idle_since = time.monotonic()
                        yield serde.heartbeat_to_worker(time.time())
                    continue
                idle_since = time.monotonic()
                codecs = self.c.codecs(msg.job) if isinstance(msg, Packets) else ("raw", "raw")
                nbytes = 0
                for raw in serde.to_worker(msg, seq, *codecs):
                    nbytes += len(raw)
                    yield raw
                if isinstance(msg, Packets):
                    self.c.sent(msg.job, nbytes)
                seq += 1
        finally:
            self.c.disconnect(worker_id, stream, leaving=leaving.is_set())

    def _read(self, worker_id: str, stream: int, inbox: serde.Inbox, request_iterator, errors: queue.Queue,
              leaving: threading.Event) -> None:
        try:
            nbytes = 0  # of the message being reassembled
            for raw in request_iterator:
                nbytes += len(raw)
                msg = inbox.feed(raw)
                if msg is None:
                    continue
                if isinstance(msg, serde.Credit):
                    self.c.grant(worker_id, stream, msg.packets)
                elif isinstance(msg, serde.Goodbye):
                    log.info("worker %s says goodbye%s: %s", worker_id, " for good" if msg.leaving else "",
                             msg.reason)
                    if msg.leaving:
                        leaving.set()
                    break
                elif isinstance(msg, serde.Heartbeat):
                    self.c.worker_status(worker_id, stream, msg.status)
                else:
                    self.c.receive(worker_id, msg, nbytes)
                nbytes = 0
            errors.put(None)
        except Exception as e:  # a bad frame ends this stream with a status; other workers go on
            errors.put(e)


def _status_pb(s: JobStatus) -> control_pb2.JobStatus:
    return control_pb2.JobStatus(job=s.job, state=s.state, step=s.step, steps=s.steps, versions=s.versions,
                                 loss=s.loss, error=s.error, max_staleness=s.max_staleness)


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, coordinator: Coordinator, tokens: Tokens, model_name: str | None = None):
        self.c, self.tokens, self.model_name = coordinator, tokens, model_name

    def _call(self, context, fn):
        _guard(context, self.tokens, "control")
        try:
            return fn()
        except Exception as e:
            context.abort(_status(e), _message(e))

    def SubmitJob(self, request, context):
        def submit():
            spec = JobSpec.from_dict(serde.unpack(request.spec, "spec"))
            job = self.c.submit(spec, serde.unpack(request.data, "data"), request.steps)
            return control_pb2.SubmitJobResponse(job=job)
        return self._call(context, submit)

    def GetJob(self, request, context):
        return self._call(context, lambda: control_pb2.GetJobResponse(status=_status_pb(self.c.status(request.job))))

    def ListJobs(self, request, context):
        return self._call(context, lambda: control_pb2.ListJobsResponse(jobs=[_status_pb(s) for s in self.c.statuses()]))

    def CancelJob(self, request, context):
        return self._call(context, lambda: control_pb2.CancelJobResponse(status=_status_pb(self.c.cancel(request.job))))

    def StreamMetrics(self, request, context):
        self._call(context, lambda: self.c.status(request.job))  # auth and existence first
        sent = request.since
        while context.is_active():
            new, ended = self._call(context, lambda: self.c.metrics(request.job, sent,
                                                                    timeout=0.5 if request.follow else 0.0))
            for m in new:
                yield control_pb2.StreamMetricsResponse(metrics=serde.pack(m))
            sent += len(new)
            if not request.follow or (ended and not new):
                return

    def ExportAdapter(self, request, context):
        def files():
            e = self.c.export(request.job)
            with tempfile.TemporaryDirectory() as tmp:
                if request.format in ("", "native"):
                    path = save(e.adapters, e.spec, Path(tmp) / "out", e.versions)
                elif request.format == "peft":
                    path = save_peft(e.adapters, Path(tmp) / "out", base_model=self.model_name,
                                     task_type=peft_task_type(self.c.host.model))
                else:
                    raise ValueError(f"`format` must be native or peft, got {request.format!r}")
                return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
        for name, data in self._call(context, files).items():
            for off in range(0, max(len(data), 1), serde.CHUNK_BYTES):
                piece = data[off:off + serde.CHUNK_BYTES]
                yield control_pb2.ExportAdapterResponse(file=name, offset=off, data=piece,
                                                        last=off + len(piece) >= len(data))

    def Health(self, request, context):
        h = self.c.health()
        return control_pb2.HealthResponse(status=h.status, workers=h.workers, jobs=h.jobs)


def make_server(coordinator: Coordinator, tokens: Tokens, address: str = "127.0.0.1:0",
                tls: tuple[bytes, bytes, bytes | None] | None = None,
                model_name: str | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server with both services; returns it (not started) and its bound port."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS)
    add_worker_service(server, WorkerService(coordinator, tokens))
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(coordinator, tokens, model_name), server)
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
    if port == 0:
        raise OSError(f"cannot listen on {address}: the port is taken (another colaflow serve?) or the "
                      "address is not this machine's")
    return server, port
