"""gRPC servicers: parse, check, call the coordinator, map exceptions to status codes. Thin."""
from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from pathlib import Path

import grpc

from colaflow import serde
from colaflow.export import save, save_peft
from colaflow.job import JobSpec
from colaflow.v1 import control_pb2, control_pb2_grpc, worker_pb2, worker_pb2_grpc
from colaflow.wire import CHANNEL_OPTIONS, add_worker_service

from .auth import Tokens
from .coordinator import Coordinator

log = logging.getLogger("colaflow.server")
MAX_MESSAGE_BYTES = 64 << 20
HEARTBEAT_S = 1.0


def _status(e: Exception) -> grpc.StatusCode:
    """One mapping from plain-Python errors to gRPC status codes."""
    if isinstance(e, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _guard(context, tokens: Tokens, role: str) -> None:
    if not tokens.allows(context.invocation_metadata(), role):
        context.abort(grpc.StatusCode.UNAUTHENTICATED if tokens.role(context.invocation_metadata()) is None
                      else grpc.StatusCode.PERMISSION_DENIED, f"this call needs a `{role}` token")


class WorkerService(worker_pb2_grpc.WorkerServicer):
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
        try:
            hello = serde.parse_message(next(request_iterator), worker_pb2.WorkerMessage)[0].hello
            progress = [(p.job, p.site, p.version, p.fitted_through) for p in hello.progress]
            stream = self.c.connect(worker_id, hello.session, progress)
        except StopIteration:
            return
        except Exception as e:
            context.abort(_status(e), _message(e))
        errors: queue.Queue = queue.Queue()
        reader = threading.Thread(target=self._read, args=(worker_id, request_iterator, errors), daemon=True)
        reader.start()
        seq, idle_since = 0, time.monotonic()
        try:
            while context.is_active():
                if not errors.empty():
                    e = errors.get()
                    if e is None:
                        return  # the worker said goodbye or closed its side
                    log.warning("worker %s sent a bad frame: %s", worker_id, e)
                    context.abort(_status(e), _message(e))
                msg = self.c.next_message(worker_id, stream, timeout=0.2)
                if msg is None:
                    if time.monotonic() - idle_since >= HEARTBEAT_S:
                        idle_since = time.monotonic()
                        yield serde.frame_message(worker_pb2.ServerMessage(heartbeat=worker_pb2.Heartbeat(time=time.time())))
                    continue
                idle_since = time.monotonic()
                if msg[0] == "closed":
                    return
                yield from self._encode(msg, seq)
                seq += 1
        finally:
            self.c.disconnect(worker_id, stream)

    def _read(self, worker_id: str, request_iterator, errors: queue.Queue) -> None:
        updates = serde.Reassembler(max_bytes=MAX_MESSAGE_BYTES)
        try:
            for raw in request_iterator:
                msg, payload = serde.parse_message(raw, worker_pb2.WorkerMessage)
                kind = msg.WhichOneof("kind")
                if kind == "credit":
                    self.c.grant(worker_id, min(msg.credit.packets, 1024))
                elif kind == "update":
                    whole = updates.feed(msg.update, payload)
                    if whole is not None:
                        frame = worker_pb2.UpdateFrame.FromString(whole[0])
                        update, fitted = serde.update_from_proto(frame, whole[1])
                        self.c.receive_update(worker_id, update, fitted)
                elif kind == "goodbye":
                    log.info("worker %s says goodbye: %s", worker_id, msg.goodbye.reason)
                    break
            errors.put(None)
        except Exception as e:  # a bad frame ends this stream with a status; other workers go on
            errors.put(e)

    def _encode(self, msg: tuple, seq: int):
        """Framed ServerMessages for one coordinator message."""
        kind, env = msg[0], worker_pb2.ServerMessage
        if kind == "assign":
            a = msg[1]
            sites = [worker_pb2.SiteInfo(site=serde.pack(site.to_dict()), version=version,
                                         params=serde.params_to_proto(params)) for site, version, params in a["sites"]]
            yield serde.frame_message(env(assignment=worker_pb2.Assignment(
                job=a["job"], spec=serde.pack(a["spec"].to_dict()), sites=sites)))
        elif kind == "packets":
            _, job_id, step, packets = msg
            spec = self.c.jobs[job_id].spec
            frame, parts = serde.packets_to_proto(packets, spec.codec_x, spec.codec_g)
            yield from serde.to_chunks(frame, parts, seq, lambda c: env(packet=c))
        elif kind == "ack":
            yield serde.frame_message(env(ack=worker_pb2.UpdateAck(job=msg[1], site=msg[2], version=msg[3])))
        elif kind == "revoke":
            yield serde.frame_message(env(revocation=worker_pb2.Revocation(job=msg[1], sites=msg[2], reason=msg[3])))


def _status_pb(job) -> control_pb2.JobStatus:
    return control_pb2.JobStatus(
        job=job.spec.job_id, state=job.state, step=job.step, steps=job.steps,
        versions={s: v for s, (v, _) in job.received.items()}, loss=job.losses[-1] if job.losses else 0.0,
        error=job.error, max_staleness=job.max_staleness)


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, coordinator: Coordinator, tokens: Tokens):
        self.c, self.tokens = coordinator, tokens

    def _call(self, context, fn):
        _guard(context, self.tokens, "control")
        try:
            return fn()
        except Exception as e:
            context.abort(_status(e), _message(e))

    def SubmitJob(self, request, context):
        def submit():
            spec = JobSpec.from_dict(serde.unpack(request.spec, "spec"))
            return control_pb2.SubmitJobResponse(job=self.c.submit(spec, serde.unpack(request.data, "data"),
                                                                   request.steps))
        return self._call(context, submit)

    def GetJob(self, request, context):
        return self._call(context, lambda: control_pb2.GetJobResponse(status=_status_pb(self.c.job(request.job))))

    def ListJobs(self, request, context):
        return self._call(context, lambda: control_pb2.ListJobsResponse(
            jobs=[_status_pb(j) for j in list(self.c.jobs.values())]))

    def CancelJob(self, request, context):
        return self._call(context, lambda: control_pb2.CancelJobResponse(status=_status_pb(self.c.cancel(request.job))))

    def StreamMetrics(self, request, context):
        job = self._call(context, lambda: self.c.job(request.job))
        sent = 0
        while context.is_active():
            with self.c.lock:
                new = job.metrics[sent:]
                if not new and job.state not in ("waiting", "running"):
                    return
                if not new:
                    self.c.cond.wait(0.5)
                    continue
            for m in new:
                yield control_pb2.StreamMetricsResponse(metrics=serde.pack(m))
            sent += len(new)

    def ExportAdapter(self, request, context):
        def files():
            job = self.c.job(request.job)
            adapters = self.c.host.jobs[request.job].adapters
            with tempfile.TemporaryDirectory() as tmp:
                if request.format in ("", "native"):
                    path = save(adapters, job.spec, Path(tmp) / "out", {s: v for s, (v, _) in job.received.items()})
                elif request.format == "peft":
                    path = save_peft(adapters, Path(tmp) / "out")
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
        return control_pb2.HealthResponse(status="serving", workers=h["workers"], jobs=h["jobs"])


def make_server(coordinator: Coordinator, tokens: Tokens, address: str = "127.0.0.1:0",
                tls: tuple[bytes, bytes, bytes | None] | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server with both services; returns it (not started) and its bound port."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=CHANNEL_OPTIONS)
    add_worker_service(server, WorkerService(coordinator, tokens))
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(coordinator, tokens), server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        key, cert, client_ca = tls
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                            require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port
