"""The control service on grpc.aio: jobs, scoped to the caller's tenant. Thin: each RPC checks the
token, calls the coordinator (submit, health) or the scheduler (status, cancel, delete, metrics,
weights) — off the event loop where the work is heavy — and maps exceptions to status codes (`rpc.py`).

A data map costs ~10x its packed bytes in memory while it is parsed and checked, so at most
PARSING submits do that at once; an `init` export is checked from its metadata before anything is
built (`colaflow.export.init_params`)."""
from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

import grpc

from colaflow.errors import ColaflowError
from colaflow.export import write
from colaflow.job import JobSpec
from colaflow.v1 import control_pb2, control_pb2_grpc
from colaflow.wire.control_serde import pack, status_to_proto, unpack
from colaflow.wire.framing import CHUNK_BYTES
from colaflow.wire.tokenizer import to_files

from . import heap
from .auth import Tokens
from .coordinator import Coordinator
from .rpc import identity, message, status_code
from .uploads import UploadLimits, Uploads

PARSING = 2  # submits whose data maps are parsed at once
TRIM_AFTER = 1 << 20  # a submit of at least this many bytes returns its parse's memory to the OS


class ControlService(control_pb2_grpc.ControlServicer):
    """Jobs, scoped to the caller's tenant: another tenant's job reads as unknown; admin sees all."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, model_name: str | None = None, tokenizer=None,
                 upload_limits: UploadLimits | None = None):
        self.coordinator, self.scheduler = coordinator, coordinator.scheduler
        self.tokens, self.model_name, self.tokenizer = tokens, model_name, tokenizer
        self.uploads = Uploads(upload_limits)
        self._tokenizer_files: dict[str, bytes] | None = None  # saved once, on the first GetTokenizer
        self._parsing = threading.BoundedSemaphore(PARSING)

    async def _call(self, context, fn, in_thread: bool = False):
        who = await identity(context, self.tokens, "control")
        try:
            if in_thread:  # heavy work (parsing a dataset, writing an export) stays off the event loop
                return await asyncio.to_thread(fn, who.tenant)
            return fn(who.tenant)
        except Exception as e:
            await context.abort(status_code(e), message(e))

    async def SubmitJob(self, request, context):
        def submit(tenant):
            spec = JobSpec.from_dict(unpack(request.spec, "spec"))
            if request.upload and request.data:
                raise ValueError("pass `data` or `upload`, not both")
            data = self.uploads.claim(request.upload, tenant or "default") if request.upload else request.data
            try:
                with self._parsing:
                    job = self.coordinator.submit(spec, unpack(data, "data"), request.steps, tenant or "default",
                                                  request.init or None, data_bytes=len(data))
            finally:
                if len(data) >= TRIM_AFTER:  # the parse's transient objects are free now: give them back
                    heap.trim()
            return control_pb2.SubmitJobResponse(job=job, notes=self.scheduler.notes(job))
        return await self._call(context, submit, in_thread=True)

    async def GetTokenizer(self, request, context):
        def files(tenant):
            if self.tokenizer is None:
                raise ColaflowError(f"the server's model {self.model_name!r} has no tokenizer: submit pre-tokenised "
                                    "rows (`input_ids`, `labels`) or tokenise with your own")
            if self._tokenizer_files is None:
                self._tokenizer_files = to_files(self.tokenizer)
            vocab, context = self.coordinator.host.limits()
            return control_pb2.GetTokenizerResponse(model=self.model_name or "", max_length=context or 0,
                                                    vocab_size=vocab or 0, files=self._tokenizer_files)
        return await self._call(context, files, in_thread=True)

    async def UploadData(self, request_iterator, context):
        who = await identity(context, self.tokens, "control")
        upload = None
        try:
            async for r in request_iterator:
                if upload is None:
                    upload = self.uploads.begin(who.tenant or "default", r.total_bytes)
                self.uploads.add(upload, r.data)
            if upload is None:
                raise ValueError("an upload needs at least one chunk")
            size = self.uploads.finish(upload)
        except BaseException as e:  # a refused chunk or a broken stream: its bytes are freed now
            if upload is not None:
                self.uploads.abandon(upload)
            if not isinstance(e, Exception):
                raise
            await context.abort(status_code(e), message(e))
        return control_pb2.UploadDataResponse(upload=upload, bytes=size)

    async def GetJob(self, request, context):
        return await self._call(context, lambda t: control_pb2.GetJobResponse(
            status=status_to_proto(self.scheduler.status(request.job, t))))

    async def ListJobs(self, request, context):
        return await self._call(context, lambda t: control_pb2.ListJobsResponse(
            jobs=[status_to_proto(s) for s in self.scheduler.statuses(t)]))

    async def CancelJob(self, request, context):
        def cancel(tenant):
            self.scheduler.cancel(request.job, "cancelled", tenant)
            return control_pb2.CancelJobResponse(status=status_to_proto(self.scheduler.status(request.job, tenant)))
        return await self._call(context, cancel)

    async def DeleteJob(self, request, context):
        def delete(tenant):
            self.scheduler.delete(request.job, tenant)
            return control_pb2.DeleteJobResponse()
        return await self._call(context, delete, in_thread=True)

    async def StreamMetrics(self, request, context):
        sent = request.since
        while True:
            new, ended = await self._call(context, lambda t, sent=sent: self.scheduler.metrics(request.job, sent, t))
            for m in new:
                yield control_pb2.StreamMetricsResponse(metrics=pack(m))
            sent += len(new)
            if not request.follow or (ended and not new):
                return
            if not new:
                await asyncio.sleep(0.2)

    async def ExportAdapter(self, request, context):
        def files(tenant):
            weights = self.scheduler.weights(request.job, request.which or "last", tenant)
            with tempfile.TemporaryDirectory() as tmp:
                path = write(weights, Path(tmp) / "out", request.format or "native", model=self.coordinator.host.model,
                             base_model=self.model_name)
                return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
        for name, data in (await self._call(context, files, in_thread=True)).items():
            for off in range(0, max(len(data), 1), CHUNK_BYTES):
                piece = data[off:off + CHUNK_BYTES]
                yield control_pb2.ExportAdapterResponse(file=name, offset=off, data=piece,
                                                        last=off + len(piece) >= len(data))

    async def ListWorkers(self, request, context):
        """Admin only: a tenant sees the workers of its own jobs in their status, never the whole fleet."""
        who = await identity(context, self.tokens, "control")
        if who.role != "admin":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "wrong role: this is a `control` token; listing workers needs an `admin` token "
                                "(a job's own workers are in its status)")
        return control_pb2.ListWorkersResponse(workers=pack(self.scheduler.workers_view()))

    async def Health(self, request, context):
        """Anyone may ask whether the server serves; only a control or admin token learns the counts."""
        who = self.tokens.identity(context.invocation_metadata())
        h = self.coordinator.health(who.tenant if who is not None else None)
        if who is None or who.role not in ("control", "admin"):
            return control_pb2.HealthResponse(status="serving" if h.status == "serving" else "unhealthy")
        return control_pb2.HealthResponse(status=h.status, workers=h.workers, jobs=h.jobs)
