"""Views: what operators and tenants see of the scheduler, copied out under its lock.

Every answer is scoped: a tenant sees its own jobs only (another tenant's job reads as unknown),
`tenant=None` is admin. `status` is the one job-status type (`JobInfo`) end to end; `jobs_view`
and `workers_view` are the one plain-Python picture of jobs and workers (the status page,
`/metrics`, `colaflow workers`).
"""
from __future__ import annotations

import threading

from .lock import locked
from .records import LIVE, JobRecord, WorkerRecord
from .status import JobInfo

RATE_WINDOW_S = 30.0  # a worker's fits/s are its fits in this many seconds, divided by them


class Views:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock

    @locked
    def find(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job, if `tenant` may see it (None: admin). Another tenant's job reads as unknown."""
        job = self.jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise KeyError(f"unknown job {job_id!r}")
        return job

    @locked
    def status(self, job_id: str, tenant: str | None = None) -> JobInfo:
        job = self.find(job_id, tenant)
        return JobInfo(job_id, job.state, job.t, job.steps or 0, job.last_loss, job.error, job.max_staleness,
                       sorted({r.owner for r in job.sites.values() if r.owner is not None}),
                       {n: r.received for n, r in job.sites.items()})

    @locked
    def statuses(self, tenant: str | None = None) -> list[JobInfo]:
        return [self.status(j) for j, job in self.jobs.items() if tenant in (None, job.tenant)]

    @locked
    def metrics(self, job_id: str, since: int = 0, tenant: str | None = None) -> tuple[list[dict], bool]:
        """The job's metric rows after the first `since`, and whether it has ended."""
        job = self.find(job_id, tenant)
        return [dict(m) for m in job.metrics[since:]], job.state not in LIVE

    @locked
    def counts(self, tenant: str | None = None) -> tuple[int, int]:
        """(workers connected, jobs `tenant` sees)."""
        return (sum(w.connected for w in self.workers.values()),
                sum(tenant in (None, j.tenant) for j in self.jobs.values()))

    @locked
    def jobs_view(self, tenant: str | None = None) -> list[dict]:
        """Every job `tenant` sees (None: all), for the status page and /metrics: its status, owner,
        counters, queue depths (packets kept until durable state covers them; of those, not yet sent
        to a connected owner) and its last 20 metrics."""
        out = []
        for job_id, job in self.jobs.items():
            if tenant not in (None, job.tenant):
                continue
            unsent = 0
            for name, rec in job.sites.items():
                w = self.workers.get(rec.owner) if rec.owner is not None else None
                cursor = w.cursor.get((job_id, name), -1) if w is not None and w.connected else -1
                unsent += sum(step > cursor for step in rec.retained)
            view = vars(self.status(job_id))
            view.update(tenant=job.tenant, fits=job.fits, bytes_sent=job.bytes_sent,
                        bytes_received=job.bytes_received, packets_unsent=unsent,
                        packets_retained=sum(len(r.retained) for r in job.sites.values()),
                        recent=[dict(m) for m in job.metrics[-20:]])
            out.append(view)
        return out

    @locked
    def workers_view(self) -> list[dict]:
        """Every worker the server knows, for the status page and `colaflow workers`: `worker`, `state`
        (connected, unhealthy, disconnected, lost, left, quarantined; `detail` says why; a lost or left
        worker is shown until it returns or is forgotten), `last_seen_s`, `sites`
        {job: [site, ...]} of live jobs, `fits_per_s` (over the last RATE_WINDOW_S), `bytes_in` (its
        updates' wire bytes, to the server) and `bytes_out` (packets' wire bytes, to it)."""
        now = self.clock()
        owned: dict[str, dict[str, list[str]]] = {}
        for job_id, job in self.jobs.items():
            for name, rec in job.sites.items():
                if rec.owner is not None and job.state in LIVE:
                    owned.setdefault(rec.owner, {}).setdefault(job_id, []).append(name)
        out = []
        for w in sorted(self.workers.values(), key=lambda w: w.worker_id):
            state = ("quarantined" if w.quarantined else "connected" if w.connected and not w.status
                     else "unhealthy" if w.connected else "disconnected" if w.lost_at is None
                     else "left" if w.left else "lost")
            detail = w.quarantined or w.status or (
                f"{state} {now - w.lost_at:.0f} s ago; its sites moved" if w.lost_at is not None else "")
            out.append({"worker": w.worker_id, "state": state, "detail": detail,
                        "last_seen_s": None if w.last_seen is None else max(0.0, now - w.last_seen),
                        "sites": owned.get(w.worker_id, {}),
                        "fits_per_s": sum(now - t <= RATE_WINDOW_S for t in w.fit_times) / RATE_WINDOW_S,
                        "bytes_in": w.bytes_in, "bytes_out": w.bytes_out})
        return out
