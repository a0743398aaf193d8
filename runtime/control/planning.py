"""Planning: which job steps next, with exactly which adapter versions, and what a finished step leaves.

Step t uses exactly version need(t) = max(0, t - S) // I of every site — never a newer one that
happened to arrive early — so a run is a function of (spec, data, seed). A job moves waiting ->
running -> done (or cancelled, failed); `ready` also moves lost workers' sites and ends finished jobs.
"""
from __future__ import annotations

import logging
import threading
import time

from ..learn.messages import Packet
from .lock import changes, locked
from .records import LIVE, Best, JobRecord, Load, StepPlan, WorkerRecord

log = logging.getLogger("colaflow.scheduler")


class Abandoned(Exception):
    """A step stopped half-way because its job stopped running (cancelled, failed, moved on)."""


class Planning:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock

    @changes
    def cancel(self, job_id: str, reason: str = "cancelled", tenant: str | None = None) -> JobRecord:
        """End a live job, cancelled (`tenant`: only its own; another tenant's job reads as unknown)."""
        job = self.find(job_id, tenant)
        if job.state in LIVE:
            self._end(job, "cancelled", reason)
        return job

    @changes
    def fail(self, job_id: str, reason: str) -> None:
        job = self.job(job_id)
        if job.state in LIVE:
            log.error("job %s failed: %s", job_id, reason)
            self._end(job, "failed", reason)

    @locked
    def take_ended(self) -> list[str]:
        """Jobs that ended since the last call (the driver frees their host state)."""
        out, self._ended = self._ended, []
        return out

    @locked
    def latest(self, job_id: str) -> list[Load]:
        """The newest received version of every site, for the host to load now (the Trainer's `flush`)."""
        job = self.job(job_id)
        return [Load(job_id, name, rec.received, rec.versions[rec.received])
                for name, rec in job.sites.items() if rec.received > 0]

    @changes
    def ready(self, layered: bool = False) -> list[str]:
        """Jobs whose next step may run now; also moves lost workers' sites and finishes jobs.

        `layered`: also jobs whose step may start before every site's version is in (the forward
        waits at each site for its own; see `begin`), but not those that merge their weights.
        """
        self._reassign_lost()
        self._move_stalled()
        self._retain()  # ended jobs past the retention policy go
        if not self._flush():
            return []  # no step runs while the store cannot keep what steps change
        return [j.job_id for j in list(self.jobs.values()) if self._advance(j, layered and self._startable(j))]

    def _startable(self, job: JobRecord) -> bool:
        """May this job's step start before its versions are in: no merge, and every site still
        waiting has a connected owner (else nothing would arrive)."""
        need = job.need(job.t)
        return not job.spec.merge and all(
            r.received >= need or (r.owner in self.workers and self.workers[r.owner].connected)
            for r in job.sites.values())

    @locked
    def begin(self, job_id: str, layered: bool = False, held: dict[str, int] | None = None) -> StepPlan:
        """The plan of a ready job's next step; raises if it is not ready. `held`: the version each site's
        copy on the host holds now (`Host.versions`), so the plan loads only the others (None: every
        site). With `layered`, sites whose version is not in yet are `plan.waiting`: take each with
        `arrived` before the forward uses it."""
        job = self.job(job_id)
        layered = layered and not job.spec.merge  # merged weights are made before the forward starts
        if not self._advance(job, layered):
            lagging = {n: r.received for n, r in job.sites.items() if r.received < job.need(job.t)}
            raise RuntimeError(f"job {job_id!r} ({job.state}) cannot run step {job.t}: it needs version "
                               f"{job.need(job.t)} of every site; behind: {lagging}")
        need, apply, waiting = job.need(job.t), [], []
        for name, rec in job.sites.items():
            if rec.received < need:
                waiting.append(name)
            elif held is None or held.get(name) != need:
                apply.append(Load(job_id, name, need, self._params(job, rec, need)))
        # what the step could have used at its start; a step run again (after a restart) does not count
        # the versions its own fits made the first time
        newest = min(max(r.received for r in job.sites.values()), job.t // job.spec.fit_interval)
        return StepPlan(job_id, job.t, need, apply, waiting, max(0, newest - need))

    @locked
    def arrived(self, plan: StepPlan, site: str) -> Load | None:
        """A waiting site's version for `plan` once it is in (None: not yet); raises `Abandoned` if
        the job stopped running meanwhile."""
        job = self.jobs.get(plan.job)
        if job is None or job.state != "running" or job.t != plan.step:
            raise Abandoned(f"job {plan.job!r} stopped while step {plan.step} waited for `{site}`")
        rec = job.sites[site]
        if rec.received < plan.need:
            return None
        return Load(plan.job, site, plan.need, self._params(job, rec, plan.need))

    @changes
    def publish(self, plan: StepPlan, packet: Packet) -> None:
        """One packet of a running step: its owner may have it now (a step streams its packets)."""
        job = self.jobs.get(plan.job)
        if job is None or job.state != "running" or job.t != plan.step:
            return  # cancelled or failed while the step ran
        if packet.site not in job.sites or (packet.step, packet.version) != (plan.step, plan.need):
            raise RuntimeError(f"host packet for site `{packet.site}` is of step {packet.step} and used version "
                               f"{packet.version}; the scheduler planned step {plan.step} with version {plan.need}")
        rec = job.sites[packet.site]
        if plan.step <= self._floor(job, rec):
            return  # durable state already folds this step in (its fit came back before the step ended)
        rec.retained[plan.step] = packet

    @changes
    def finish(self, plan: StepPlan, packets: list[Packet], loss: float, tokens: int, seconds: float = 0.0,
               evals: dict[str, float] | None = None) -> None:
        """Take a step's packets (those not published during it) and advance the job; `evals`: the
        step's eval metrics (`eval_*`, from the adapters this step used), which may stop it early."""
        job = self.jobs.get(plan.job)
        if job is None or job.state != "running" or job.t != plan.step:
            return  # cancelled or failed while the step ran
        for p in packets:
            self.publish(plan, p)
        job.max_staleness = max(job.max_staleness, plan.staleness)
        now = time.time()
        # wall time since this job's previous step ended: waits for devices and evals count too
        wall = now - job.metrics[-1]["time"] if job.metrics else seconds
        m = {"step": plan.step, "loss": loss, "tokens": tokens, "staleness": plan.staleness,
             "seconds": seconds, "time": now,  # seconds: the server's compute
             "fits": job.fits, "bytes_sent": job.bytes_sent, "bytes_received": job.bytes_received,
             "tokens_per_s": tokens / wall if wall > 0 else 0.0, **self._fit_metrics(job, plan.need)}
        job.metrics.append({**m, **(evals or {})})
        if job.events:
            job.metrics[-1]["events"], job.events = job.events, []
        job.t += 1
        if evals and job.watch is not None and job.watch.key in evals:
            self._judge(job, plan, float(evals[job.watch.key]))
        self._save_progress(job)

    def _fit_metrics(self, job: JobRecord, version: int) -> dict:
        """`lr` and `grad_norm` of the fit that made `version` (the one this step used): the norm over
        all of the job's sites, sqrt(sum of each site's squared norm). {} for version 0 or unreported."""
        stats = job.fit_stats.get(version, {})
        for v in [v for v in job.fit_stats if v < version]:
            del job.fit_stats[v]  # no later step uses an older version
        if version == 0 or set(stats) != set(job.sites):
            return {}
        return {"lr": max(lr for _, lr in stats.values()),
                "grad_norm": sum(n * n for n, _ in stats.values()) ** 0.5}

    def _judge(self, job: JobRecord, plan: StepPlan, score: float) -> None:
        """Keep the best eval step's adapters; end the job after `patience` evals without improvement."""
        watch = job.watch
        if job.best is None or watch.better(score, job.best.score):
            job.best = Best(plan.step, score, {n: plan.need for n in job.sites},
                            {n: self._params(job, r, plan.need) for n, r in job.sites.items()})
            job.stale_evals = 0
            return
        job.stale_evals += 1
        if watch.patience is not None and job.stale_evals >= watch.patience:
            why = (f"stopped early at step {plan.step}: no eval improvement in {watch.patience} evals "
                   f"(best {watch.key} {job.best.score:.4g} at step {job.best.step})")
            log.info("job %s %s", job.job_id, why)
            self._end(job, "done", why)

    def _advance(self, job: JobRecord, layered: bool = False) -> bool:
        """Move a job through waiting -> running -> done; True if its next step may run now."""
        if job.state == "waiting" and all(r.owner is not None for r in job.sites.values()):
            job.state = "running"
            self._save_progress(job)
        if job.state != "running":
            return False
        if job.steps is not None and job.t >= job.steps:
            if all(r.received >= job.final_version() for r in job.sites.values()):
                log.info("job %s done after %d steps", job.job_id, job.steps)
                self._end(job, "done", "")
            return False
        need = job.need(job.t)
        return layered or all(r.received >= need for r in job.sites.values())

    def _end(self, job: JobRecord, state: str, reason: str) -> None:
        job.state, job.error = state, reason
        self._max_update = None
        self._revoke(job, reason or state)
        for rec in job.sites.values():
            rec.retained.clear()
            rec.versions = {rec.received: rec.versions[rec.received]} if rec.received else {}
        self._release(job)  # its data (retention.py)
        self._save_progress(job)
        self._ended.append(job.job_id)
