"""Proto <-> Python for the control service, in to_proto / from_proto pairs: job statuses, and the
msgpack maps of specs, metrics and workers. Torch-free, so the operator CLI and `Client` load fast;
the Work stream's messages (tensors) are `serde.py`'s."""
from __future__ import annotations

from ..control.status import JobInfo
from ..maps import pack, unpack
from ..v1 import control_pb2

__all__ = ["pack", "status_from_proto", "status_to_proto", "unpack"]


def status_to_proto(s: JobInfo) -> control_pb2.JobStatus:
    return control_pb2.JobStatus(job=s.job, state=s.state, step=s.step, steps=s.steps, versions=s.versions,
                                 loss=s.loss, error=s.error, max_staleness=s.max_staleness, workers=s.workers)


def status_from_proto(m: control_pb2.JobStatus) -> JobInfo:
    return JobInfo(m.job, m.state, m.step, m.steps, m.loss, m.error, m.max_staleness, list(m.workers),
                   dict(m.versions))
