"""A Python client for the control service: submit, watch and export jobs on a colaflow server.

    c = Client("127.0.0.1:7000", token="...")
    c.submit(JobSpec("acme"), examples, steps=100, batch_size=8)
    for m in c.metrics("acme"): print(m["step"], m["loss"])
    c.export("acme", "acme-adapter")             # native format; format="peft" for PEFT LoRA
"""
from __future__ import annotations

from pathlib import Path

import grpc

from . import serde
from .job import JobSpec
from .v1 import control_pb2, control_pb2_grpc
from .wire import MAX_MESSAGE_BYTES


class Client:
    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None):
        opts = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=opts)
                        if tls_ca else grpc.insecure_channel(address, options=opts))
        self.stub = control_pb2_grpc.ControlStub(self.channel)
        self.md = [("authorization", f"Bearer {token}")] if token else []

    def submit(self, spec: JobSpec, examples: list[dict], steps: int, batch_size: int = 8, seed: int = 0) -> str:
        """Submit a job; `examples` are dicts of token-id lists (`input_ids`, optional `labels`)."""
        data = {"examples": [{k: [int(t) for t in v] for k, v in e.items() if k in ("input_ids", "labels")}
                             for e in examples], "batch_size": batch_size, "seed": seed}
        r = self.stub.SubmitJob(control_pb2.SubmitJobRequest(spec=serde.pack(spec.to_dict()), data=serde.pack(data),
                                                             steps=steps), metadata=self.md, timeout=60)
        return r.job

    def get(self, job: str) -> control_pb2.JobStatus:
        return self.stub.GetJob(control_pb2.GetJobRequest(job=job), metadata=self.md, timeout=30).status

    def list(self) -> list[control_pb2.JobStatus]:
        return list(self.stub.ListJobs(control_pb2.ListJobsRequest(), metadata=self.md, timeout=30).jobs)

    def cancel(self, job: str) -> control_pb2.JobStatus:
        return self.stub.CancelJob(control_pb2.CancelJobRequest(job=job), metadata=self.md, timeout=30).status

    def metrics(self, job: str):
        """Yield each step's metrics map until the job ends."""
        for m in self.stub.StreamMetrics(control_pb2.StreamMetricsRequest(job=job), metadata=self.md):
            yield serde.unpack(m.metrics, "metrics")

    def export(self, job: str, path: str | Path, format: str = "native") -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytearray] = {}
        for r in self.stub.ExportAdapter(control_pb2.ExportAdapterRequest(job=job, format=format), metadata=self.md):
            files.setdefault(r.file, bytearray()).extend(r.data)
        for name, data in files.items():
            (path / name).write_bytes(bytes(data))
        return path

    def health(self) -> control_pb2.HealthResponse:
        return self.stub.Health(control_pb2.HealthRequest(), metadata=self.md, timeout=10)

    def close(self) -> None:
        self.channel.close()
