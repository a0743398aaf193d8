"""Retention: what an ended job keeps, for how long, and what a tenant's jobs may hold on disk.

A job that ends lets go at once of what only a live job needs: its data map (in memory and on disk),
its retained packets and every version but its last (planning's `_end`). What `status`, `logs` and
`export` read — spec, sites, last and best adapters, metric rows — stays until the job is deleted:
by its tenant (`delete`: `colaflow delete JOB`, `Control.DeleteJob`) or by the server's `Policy`,
which keeps at most `keep` ended jobs per tenant (the oldest go first) for at most `max_age_s`
after each ended. `check_quota` refuses a submit that would take a tenant's jobs past
`tenant_bytes` in the state dir, saying how much they hold.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..errors import ColaflowError, ResourceExhausted
from .lock import changes, locked
from .records import LIVE, JobRecord, WorkerRecord
from .store import Store

log = logging.getLogger("colaflow.scheduler")
SWEEP_S = 10.0  # how often (scheduler clock) `ready` looks for ended jobs past their age


@dataclass(frozen=True)
class Policy:
    """How long ended jobs are kept; None: for ever (the in-process Trainer, tests)."""

    keep: int | None = 100  # ended jobs kept per tenant
    max_age_s: float | None = 7 * 86400.0  # seconds an ended job is kept after it ended
    tenant_bytes: int | None = None  # state-dir bytes one tenant's jobs may hold (None: no quota)

    def __post_init__(self):
        for name in ("keep", "max_age_s", "tenant_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"retention `{name}` must be a number >= 0 or None, got {value!r}")


KEEP_ALL = Policy(keep=None, max_age_s=None)


class Retention:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock
    store: Store
    policy: Policy
    _dirty: set[str]
    _swept_at: float | None  # when `_retain` last looked (None: at the next `ready`)

    @changes
    def delete(self, job_id: str, tenant: str | None = None) -> None:
        """Forget an ended job of `tenant` (None: admin): its records, metrics and state-dir files."""
        job = self.find(job_id, tenant)
        if job.state in LIVE:
            raise ColaflowError(f"job {job_id!r} is {job.state}: cancel it first (`colaflow cancel {job_id}`), "
                                "then delete it")
        self._delete(job, "deleted by its tenant")

    @locked
    def check_quota(self, tenant: str, adding: int) -> None:
        """Refuse (`ResourceExhausted`, with the figures) a new job of `tenant` that would bring its
        jobs' state-dir bytes past the policy's quota; `adding`: the new job's packed data."""
        quota = self.policy.tenant_bytes
        if quota is None:
            return
        used = sum(self.store.job_bytes(j) for j, job in self.jobs.items() if job.tenant == tenant)
        if used + adding > quota:
            raise ResourceExhausted(
                f"tenant {tenant!r} holds {used / 2**20:.1f} MiB in the server's state dir; this job's "
                f"{adding / 2**20:.1f} MiB would pass its quota of {quota / 2**20:.1f} MiB (--tenant-disk-mb): "
                "delete ended jobs (`colaflow delete JOB`) or cancel live ones")

    @locked
    def usage(self, tenant: str | None = None) -> dict:
        """{jobs, ended, bytes}: what `tenant`'s jobs (None: all) hold now."""
        mine = [(j, job) for j, job in self.jobs.items() if tenant in (None, job.tenant)]
        return {"jobs": len(mine), "ended": sum(job.state not in LIVE for _, job in mine),
                "bytes": sum(self.store.job_bytes(j) for j, _ in mine)}

    def _release(self, job: JobRecord) -> None:
        """An ended job's data: only a live job needs it (a restart replays from it)."""
        job.ended_at = job.ended_at or time.time()
        job.data = None
        for w in self.workers.values():  # what was sent of it: nothing more will be
            for key in [k for k in w.cursor if k[0] == job.job_id]:
                del w.cursor[key]
        try:
            self.store.drop_data(job.job_id)
        except OSError as e:  # the next restart drops it again
            log.warning("job %s: could not drop its data from the state dir: %s", job.job_id, e)
        self._swept_at = None  # look at the tenant's count at the next `ready`

    def _retain(self) -> None:
        """Delete the ended jobs the policy no longer keeps (called by `ready`, at most every SWEEP_S)."""
        now = self.clock()
        if self._swept_at is not None and now - self._swept_at < SWEEP_S:
            return
        self._swept_at = now
        keep, age, wall = self.policy.keep, self.policy.max_age_s, time.time()
        if keep is None and age is None:
            return
        ended: dict[str, list[JobRecord]] = {}
        for job in sorted((j for j in self.jobs.values() if j.state not in LIVE), key=lambda j: j.ended_at or 0.0):
            ended.setdefault(job.tenant, []).append(job)
        for jobs in ended.values():
            over = len(jobs) - keep if keep is not None else 0
            for i, job in enumerate(jobs):
                if i < over:
                    self._delete(job, f"its tenant has more than {keep} ended jobs (--keep-ended)")
                elif age is not None and wall - (job.ended_at or wall) > age:
                    self._delete(job, f"ended more than {age / 86400:g} days ago (--keep-ended-days)")

    def _delete(self, job: JobRecord, why: str) -> None:
        del self.jobs[job.job_id]
        self._dirty.discard(job.job_id)
        self.store.delete_job(job.job_id)
        log.info("job %s deleted: %s", job.job_id, why)
