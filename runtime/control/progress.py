"""Progress: what must survive a server restart goes to the `Store`, and comes back from it.

A step's progress and metric rows are stored as the step ends, an update before it is
acknowledged. A store that fails (a full disk) pauses every step, with the reason in health, and
is retried with back-off; a restarted scheduler resumes each live job at its restart step — the
first step no durable learner state covers — and replays from there with the same versions.
Restoring writes nothing (a full disk must not stop a restart): what it would write waits for the
first `_flush`, which retries as every write does.
"""
from __future__ import annotations

import logging
import secrets
import threading

from ..checks import backoff
from .records import LIVE, JobRecord, WorkerRecord, restored_job
from .store import Store

log = logging.getLogger("colaflow.scheduler")


class Progress:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock
    store: Store
    _rewrite: set[str]  # jobs whose stored metric rows a restart cut back: rewritten by the next flush

    def _save_progress(self, job: JobRecord) -> None:
        self._dirty.add(job.job_id)
        self._flush()

    def _flush(self) -> bool:
        """Store the progress of every job that changed; on failure remember why and back off."""
        if self.store_error and self.clock() < self._store_retry_at:
            return False
        try:
            for job_id in sorted(self._dirty):
                job = self.jobs[job_id]
                owners = {n: r.owner for n, r in job.sites.items() if r.owner is not None}
                if job_id in self._rewrite:  # a restart dropped the rows of the steps that run again
                    self.store.save_metrics(job_id, job.metrics, replace=True)
                    job.metrics_saved = len(job.metrics)
                    self._rewrite.discard(job_id)
                elif len(job.metrics) > job.metrics_saved:  # first: progress never gets ahead of the history
                    self.store.save_metrics(job_id, job.metrics[job.metrics_saved:])
                    job.metrics_saved = len(job.metrics)
                self.store.save_progress(job_id, {
                    "t": job.t, "state": job.state, "error": job.error, "owners": owners, "ended_at": job.ended_at,
                    "credentials": {w: self.workers[w].credential for w in set(owners.values()) if w in self.workers}})
                self._dirty.discard(job_id)
        except OSError as e:
            self._store_failed(e)
            return False
        if self.store_error:
            log.warning("the state dir takes writes again; steps resume")
            self.store_error, self._store_failures = "", 0
        return True

    def _store_failed(self, e: OSError) -> None:
        self._store_failures += 1
        delay = backoff(self._store_failures, 30.0)
        self._store_retry_at = self.clock() + delay
        if not self.store_error:
            log.error("the state dir refuses writes (%s): steps pause, retrying with back-off", e)
        self.store_error = f"{type(e).__name__}: {e}"

    def _restore(self) -> None:
        """Bring back every stored job (a restarted server): it resumes at its restart step. Writes nothing."""
        for stored in self.store.load():
            job = restored_job(stored)
            if len(stored.get("metrics", [])) != len(job.metrics):  # the rows of steps that run again go
                self._rewrite.add(job.job_id)  # at the first flush, before any step runs
                self._dirty.add(job.job_id)
            job.metrics_saved = len(job.metrics)
            if job.state not in LIVE:
                self._release(job)  # an ended job's data: dropped (that frees space, never needs it)
            credentials = (stored.get("progress") or {}).get("credentials", {})
            for wid in {r.owner for r in job.sites.values() if r.owner is not None} - set(self.workers):
                # it holds the newest state: it has `reassign_after` seconds to come back for its sites
                self.workers[wid] = WorkerRecord(wid, secrets.token_hex(8), credential=credentials.get(wid, ""),
                                                 registered_at=self.clock(), left_at=self.clock())
            self.jobs[job.job_id] = job
            log.info("job %s restored at step %d (%s)", job.job_id, job.t, job.state)
