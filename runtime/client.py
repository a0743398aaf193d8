"""A Python client for the control service: submit, watch and export jobs on a colaflow server.

    c = Client("127.0.0.1:7000", token="...")
    c.submit(JobSpec("acme"), "train.jsonl", steps=100, batch_size=8)   # any source colaflow.datasets reads
    for m in c.metrics("acme"): print(m["step"], m["loss"])
    c.export("acme", "acme-adapter")             # native format; format="peft" for PEFT LoRA

Every failure is one of colaflow's exceptions (`colaflow.errors`), never a raw grpc.RpcError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from . import serde
from .data import to_map
from .datasets import rows
from .errors import InvalidArgument, from_rpc
from .files import atomic_dir
from .job import JobSpec
from .framing import MAX_CHUNK_BYTES
from .tokenizer import from_files
from .v1 import control_pb2, control_pb2_grpc
from .wire import MAX_MESSAGE_BYTES


class Client:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None, timeout: float = 30.0):
        if not isinstance(address, str) or ":" not in address or not address.rsplit(":", 1)[1].isdigit():
            raise InvalidArgument(f"`address` must be HOST:PORT (e.g. 127.0.0.1:7000), got {address!r}")
        self.address, self.timeout = address, timeout
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=opts)
                        if tls_ca else grpc.insecure_channel(address, options=opts))
        self.stub = control_pb2_grpc.ControlStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")] if token else []
        self.chunk_bytes = MAX_CHUNK_BYTES  # a data map bigger than this goes by UploadData, in chunks this big
        self._tokenizer = None

    def _call(self, what: str, rpc, request, timeout: float | None = None):
        try:
            return rpc(request, metadata=self.md, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, what) from None

    def submit(self, spec: JobSpec, examples: object, steps: int, batch_size: int = 8, seed: int = 0,
               tokenizer=None) -> str:
        """Submit a job on any data `colaflow.datasets.rows` reads (a path, rows, a datasets.Dataset).

        Text is tokenised here with `tokenizer`, by default the server's (fetched once).
        """
        data = to_map(rows(examples, self.tokenizer if tokenizer is None else tokenizer), batch_size, seed)
        return self.submit_map(spec, data, steps)

    def submit_map(self, spec: JobSpec, data: dict, steps: int) -> str:
        """Submit a job whose data is already a data map (see colaflow.data.to_map); a big one is uploaded first."""
        packed = serde.pack(data)
        request = control_pb2.SubmitJobRequest(spec=serde.pack(spec.to_dict()), steps=steps)
        if len(packed) <= self.chunk_bytes:
            request.data = packed
        else:
            request.upload = self.upload(packed)
        timeout = 120 + (len(packed) >> 20)  # the server parses and checks every row: ~0.3 s per MiB on 2 cores
        return self._call(f"submit {spec.job_id}", self.stub.SubmitJob, request, timeout=timeout).job

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
            r = self._call("tokenizer", self.stub.GetTokenizer, control_pb2.GetTokenizerRequest(), timeout=120)
            self._tokenizer = from_files(dict(r.files), r.max_length or None)
        return self._tokenizer

    def get(self, job: str) -> control_pb2.JobStatus:
        return self._call(f"job {job}", self.stub.GetJob, control_pb2.GetJobRequest(job=job)).status

    def list(self) -> list[control_pb2.JobStatus]:
        return list(self._call("list jobs", self.stub.ListJobs, control_pb2.ListJobsRequest()).jobs)

    def cancel(self, job: str) -> control_pb2.JobStatus:
        return self._call(f"cancel {job}", self.stub.CancelJob, control_pb2.CancelJobRequest(job=job)).status

    def metrics(self, job: str, since: int = 0) -> Iterator[dict]:
        """Yield each step's metrics map as it comes, until the job ends."""
        try:
            for m in self.stub.StreamMetrics(control_pb2.StreamMetricsRequest(job=job, since=since, follow=True),
                                             metadata=self.md):
                yield serde.unpack(m.metrics, "metrics")
        except grpc.RpcError as e:
            raise from_rpc(e, f"metrics of {job}") from None

    def metrics_so_far(self, job: str, since: int = 0) -> list[dict]:
        """The metrics maps the job has so far (no waiting)."""
        request = control_pb2.StreamMetricsRequest(job=job, since=since, follow=False)
        try:
            return [serde.unpack(m.metrics, "metrics")
                    for m in self.stub.StreamMetrics(request, metadata=self.md, timeout=self.timeout)]
        except grpc.RpcError as e:
            raise from_rpc(e, f"metrics of {job}") from None

    def export(self, job: str, path: str | Path, format: str = "native") -> Path:
        """Download the job's adapters into `path` (replaced whole, or left as it was on failure)."""
        files: dict[str, bytearray] = {}
        try:
            for r in self.stub.ExportAdapter(control_pb2.ExportAdapterRequest(job=job, format=format),
                                             metadata=self.md, timeout=600):
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
