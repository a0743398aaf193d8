"""A Python client for the control service: submit, watch and export jobs on a colaflow server.

    c = Client("127.0.0.1:7000", token="...")
    c.submit(JobSpec("acme"), "train.jsonl", steps=100, batch_size=8)   # any source colaflow.datasets reads
    c.get("acme")        # JobInfo(job='acme', state='running', step=12/100, loss=2.3141, workers=['edge1'])
    for m in c.metrics("acme"): print(m["step"], m["loss"])
    c.export("acme", "acme-adapter")             # native format; format="peft" for PEFT LoRA
    c.workers()          # admin: [{worker, state, last_seen_s, sites, fits_per_s, bytes_in, bytes_out}]

Every failure is one of colaflow's exceptions (`colaflow.errors`), never a raw grpc.RpcError.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from ..control.status import JobInfo
from ..errors import InvalidArgument, from_rpc
from ..files import atomic_dir
from ..v1 import control_pb2, control_pb2_grpc
from .channel import channel
from .control_serde import pack, status_from_proto, unpack
from .framing import MAX_CHUNK_BYTES

log = logging.getLogger("colaflow.client")

if TYPE_CHECKING:
    from ..job import JobSpec

__all__ = ["Client", "JobInfo"]


class Client:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None, timeout: float = 30.0):
        if not isinstance(address, str) or ":" not in address or not address.rsplit(":", 1)[1].isdigit():
            raise InvalidArgument(f"`address` must be HOST:PORT (e.g. 127.0.0.1:7000), got {address!r}")
        self.address, self.timeout = address, timeout
        self.channel = channel(address, tls_ca)
        self.stub = control_pb2_grpc.ControlStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")] if token else []
        self.chunk_bytes = MAX_CHUNK_BYTES  # a data map bigger than this goes by UploadData, in chunks this big
        self._tokenizer = None

    def _call(self, what: str, rpc, request, timeout: float | None = None):
        try:
            return rpc(request, metadata=self.md, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, what) from None

    def submit(self, spec: JobSpec, examples: object, steps: int, batch_size: int | None = None, seed: int = 0,
               tokenizer=None, init: str | Path | None = None) -> str:
        """Submit a job on any data `colaflow.datasets.rows` reads (a path, rows, a datasets.Dataset).

        Text is tokenised here with `tokenizer`, by default the server's (fetched once). `init`: a native
        export whose weights the adapters start from (optimizer and schedule start fresh).
        """
        from ..data.batches import to_map
        from ..data.sources import rows

        data = to_map(rows(examples, self.tokenizer if tokenizer is None else tokenizer), batch_size, seed)
        return self.submit_map(spec, data, steps, init)

    def submit_map(self, spec: JobSpec, data: dict, steps: int, init: str | Path | None = None) -> str:
        """Submit a job whose data is already a data map (see colaflow.data.to_map); a big one is uploaded first."""
        from ..export import init_blob

        packed = pack(data)
        request = control_pb2.SubmitJobRequest(spec=pack(spec.to_dict()), steps=steps,
                                               init=init_blob(init) if init is not None else b"")
        if len(packed) <= self.chunk_bytes:
            request.data = packed
        else:
            request.upload = self.upload(packed)
        timeout = 120 + (len(packed) >> 20)  # the server parses and checks every row: ~0.3 s per MiB on 2 cores
        answer = self._call(f"submit {spec.job_id}", self.stub.SubmitJob, request, timeout=timeout)
        for note in answer.notes:  # the server's advice on the job as submitted
            log.warning("job %s: %s", answer.job, note)
        return answer.job

    def upload(self, packed: bytes) -> str:
        """Stream a packed data map to the server in chunks; the id SubmitJob's `upload` names."""
        view = memoryview(packed)
        chunks = (control_pb2.UploadDataRequest(total_bytes=len(packed) if off == 0 else 0,
                                                data=bytes(view[off:off + self.chunk_bytes]))
                  for off in range(0, len(packed), self.chunk_bytes))
        return self._call("upload data", self.stub.UploadData, chunks, timeout=600).upload

    def tokenizer(self):
        """The server model's tokenizer (fetched once, then kept), its model_max_length the model's context."""
        if self._tokenizer is None:
            from .tokenizer import from_files

            r = self._call("tokenizer", self.stub.GetTokenizer, control_pb2.GetTokenizerRequest(), timeout=120)
            self._tokenizer = from_files(dict(r.files), r.max_length or None)
        return self._tokenizer

    def get(self, job: str) -> JobInfo:
        return status_from_proto(self._call(f"job {job}", self.stub.GetJob, control_pb2.GetJobRequest(job=job)).status)

    def list(self) -> list[JobInfo]:
        return [status_from_proto(s) for s in self._call("list jobs", self.stub.ListJobs,
                                                         control_pb2.ListJobsRequest()).jobs]

    def cancel(self, job: str) -> JobInfo:
        return status_from_proto(self._call(f"cancel {job}", self.stub.CancelJob,
                                            control_pb2.CancelJobRequest(job=job)).status)

    def delete(self, job: str) -> None:
        """Forget an ended job: its status, metrics, adapters and files on the server (export it first)."""
        self._call(f"delete {job}", self.stub.DeleteJob, control_pb2.DeleteJobRequest(job=job))

    def workers(self) -> list[dict]:
        """Every worker the server knows (admin token): {worker, state, last_seen_s, sites {job: [site]},
        fits_per_s, bytes_in, bytes_out}; a tenant finds its jobs' workers in `get(job).workers`."""
        return unpack(self._call("list workers", self.stub.ListWorkers, control_pb2.ListWorkersRequest()).workers,
                            "workers")

    def metrics(self, job: str, since: int = 0) -> Iterator[dict]:
        """Yield each step's metrics map as it comes, until the job ends."""
        try:
            for m in self.stub.StreamMetrics(control_pb2.StreamMetricsRequest(job=job, since=since, follow=True),
                                             metadata=self.md):
                yield unpack(m.metrics, "metrics")
        except grpc.RpcError as e:
            raise from_rpc(e, f"metrics of {job}") from None

    def metrics_so_far(self, job: str, since: int = 0) -> list[dict]:
        """The metrics maps the job has so far (no waiting)."""
        request = control_pb2.StreamMetricsRequest(job=job, since=since, follow=False)
        try:
            return [unpack(m.metrics, "metrics")
                    for m in self.stub.StreamMetrics(request, metadata=self.md, timeout=self.timeout)]
        except grpc.RpcError as e:
            raise from_rpc(e, f"metrics of {job}") from None

    def export(self, job: str, path: str | Path, format: str = "native", which: str = "last") -> Path:
        """Download the job's adapters into `path`: a new directory, or an earlier export of the same
        format, replaced whole (one holding anything else is refused); a failure leaves it as it was.
        `which`: `last` (the newest version) or `best` (those of the job's best eval step)."""
        files: dict[str, bytearray] = {}
        try:
            request = control_pb2.ExportAdapterRequest(job=job, format=format, which=which)
            for r in self.stub.ExportAdapter(request, metadata=self.md, timeout=600):
                files.setdefault(r.file, bytearray()).extend(r.data)
        except grpc.RpcError as e:
            raise from_rpc(e, f"export {job}") from None
        with atomic_dir(path) as tmp:
            for name, data in files.items():
                (tmp / Path(name).name).write_bytes(bytes(data))
        return Path(path)

    def health(self) -> control_pb2.HealthResponse:
        return self._call("health", self.stub.Health, control_pb2.HealthRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()
