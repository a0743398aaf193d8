"""A Python client for the control service: submit, watch and export jobs on a colaflow server.

    c = Client("127.0.0.1:7000", token="...")
    c.submit(JobSpec("acme"), examples, steps=100, batch_size=8)
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
from .errors import InvalidArgument, from_rpc
from .files import atomic_dir
from .job import JobSpec
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

    def _call(self, what: str, rpc, request, timeout: float | None = None):
        try:
            return rpc(request, metadata=self.md, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, what) from None

    def submit(self, spec: JobSpec, examples: list[dict], steps: int, batch_size: int = 8, seed: int = 0) -> str:
        """Submit a job; `examples` are dicts of token-id lists (`input_ids`, optional `labels`)."""
        return self.submit_map(spec, to_map(examples, batch_size, seed), steps)

    def submit_map(self, spec: JobSpec, data: dict, steps: int) -> str:
        """Submit a job whose data is already a data map (see colaflow.data.to_map)."""
        request = control_pb2.SubmitJobRequest(spec=serde.pack(spec.to_dict()), data=serde.pack(data), steps=steps)
        return self._call(f"submit {spec.job_id}", self.stub.SubmitJob, request, timeout=120).job

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

    def export(self, job: str, path: str | Path, format: str = "native", which: str = "last") -> Path:
        """Download the job's adapters into `path` (replaced whole, or left as it was on failure);
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
