"""Where the scheduler keeps what must survive a server restart: the interface, and an in-memory one.

The server's state directory (`colaflow.server.dirstore.DirStore`) is the durable implementation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

if TYPE_CHECKING:
    from .records import SiteRecord


class Store:
    """Where the scheduler keeps what must survive a server restart. This one keeps nothing."""

    def save_job(self, job_id: str, record: dict) -> None:
        """Once per job: {spec, sites, steps, data}."""

    def save_progress(self, job_id: str, progress: dict) -> None:
        """After every step and state change: {t, state, error, owners}."""

    def save_site(self, job_id: str, site: str, rec: SiteRecord) -> None:
        """Before an update is acknowledged: the site's received version, versions and learner state."""

    def save_metrics(self, job_id: str, rows: list[dict], replace: bool = False) -> None:
        """With the progress: the steps' metric rows since the last call (all of them, if `replace`)."""

    def drop_data(self, job_id: str) -> None:
        """The job ended: its data map is no longer needed (frees space; must not need any)."""

    def delete_job(self, job_id: str) -> None:
        """Forget the job altogether (retention); never raises for what is already gone."""

    def job_bytes(self, job_id: str) -> int:
        """What the job holds in the store, in bytes (a tenant's quota counts them)."""
        return 0

    def trouble(self) -> str:
        """Why the store cannot take writes now, if it can tell without writing ("" : none seen)."""
        return ""

    def load(self) -> list[dict]:
        """Every stored job: {job: {...}, progress: {...} | None, sites: {name: {received, versions, state}},
        metrics: [row, ...]}."""
        return []


class MemoryStore(Store):
    """Keeps everything in a dict: survives a Scheduler being dropped (a simulated server crash)."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def save_job(self, job_id, record):
        self.jobs[job_id] = {"job": dict(record), "progress": None, "sites": {}, "metrics": []}

    def save_progress(self, job_id, progress):
        self.jobs[job_id]["progress"] = dict(progress)

    def save_site(self, job_id, site, rec):
        self.jobs[job_id]["sites"][site] = {"received": rec.received, "versions": dict(rec.versions),
                                            "state": rec.state}

    def save_metrics(self, job_id, rows, replace=False):
        kept = [] if replace else self.jobs[job_id]["metrics"]
        self.jobs[job_id]["metrics"] = kept + [dict(r) for r in rows]

    def drop_data(self, job_id):
        if job_id in self.jobs:
            self.jobs[job_id]["job"]["data"] = None

    def delete_job(self, job_id):
        self.jobs.pop(job_id, None)

    def load(self):
        return [dict(v, metrics=[dict(r) for r in v["metrics"]]) for v in self.jobs.values()]


def pack_params(params: dict[str, dict[str, torch.Tensor]]) -> bytes:
    """{site: {name: tensor}} as safetensors bytes (a job's starting weights, stored with the job)."""
    return safetensors_save({f"{site}::{n}": v.contiguous().cpu()
                             for site, ps in params.items() for n, v in ps.items()})


def unpack_params(data: bytes) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in safetensors_load(data).items():
        site, name = key.split("::", 1)
        out.setdefault(site, {})[name] = v
    return out
