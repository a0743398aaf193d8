"""The coordinator: jobs, workers, assignments, the step loop. Plain Python, no gRPC.

The gRPC servicers (`service.py`) only parse, check and call these methods. One lock guards all
state; the step loop runs `Host.step` outside it, so workers keep streaming while it computes.

Scheduling: a job may run step t once every site has version >= need(t) = floor(max(0, t-S) / I)
(S = 0: synchronous and exact). Each loop iteration runs one forward over *all* ready jobs, so
while one job waits for its devices the server computes for the others.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from colaflow.adapters import check_params, params_of
from colaflow.data import collate, from_map
from colaflow.gl import Packet, Update
from colaflow.job import JobSpec
from colaflow.sites import Site

from .host import Host
from .store import JobStore

log = logging.getLogger("colaflow.server")


@dataclass
class JobRun:
    spec: JobSpec
    steps: int
    data: Iterator[dict]
    sites: dict[str, Site]
    step: int = 0  # next step to run
    state: str = "waiting"  # waiting, running, done, cancelled, failed
    error: str = ""
    received: dict[str, tuple[int, int]] = field(default_factory=dict)  # site -> (version, fitted_through)
    losses: list[float] = field(default_factory=list)
    max_staleness: int = 0
    metrics: list[dict] = field(default_factory=list)
    recovered: bool = False  # restored from the state dir: a worker may report newer versions

    def need(self, t: int) -> int:
        """The adapter version every site must have before step t runs."""
        return max(0, t - self.spec.staleness) // self.spec.fit_interval

    def final_version(self) -> int:
        return self.steps // self.spec.fit_interval


@dataclass
class Outgoing:
    """One job's step for one worker, kept until every site in it is fitted and acknowledged."""

    job: str
    step: int
    packets: list[Packet]
    sent: bool = False


@dataclass
class WorkerState:
    worker_id: str
    session: str
    connected: bool = False
    stream: int = 0  # increments per Work stream, so a stale stream cannot steal messages
    credits: int = 0
    outbox: list[Outgoing] = field(default_factory=list)
    control: list[tuple] = field(default_factory=list)  # assignments, acks, revocations to send
    left_at: float | None = None
    capabilities: dict = field(default_factory=dict)


class Coordinator:
    def __init__(self, host: Host, reassign_after: float = 30.0, store: JobStore | None = None):
        self.host = host
        self.reassign_after = reassign_after
        self.store = store
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.jobs: dict[str, JobRun] = {}
        self.workers: dict[str, WorkerState] = {}
        self.owner: dict[tuple[str, str], str] = {}  # (job, site) -> worker id
        self._pending: list[Update] = []  # received, applied at the next step boundary
        self._stop = False
        if store is not None:
            self._restore()

    # control

    def submit(self, spec: JobSpec, data: dict, steps: int) -> str:
        """Host a job; `data` is a data map (see `colaflow.data.from_map`)."""
        if steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {steps}")
        batches = from_map(data)
        with self.lock:
            if spec.job_id in self.jobs:
                raise ValueError(f"job {spec.job_id!r} already exists")
            sites = self.host.add_job(spec)
            job = JobRun(spec, steps, batches, {s.name: s for s in sites})
            job.received = {s.name: (0, -1) for s in sites}
            self.jobs[spec.job_id] = job
            if self.store is not None:
                self.store.save_job(spec.job_id, spec.to_dict(), data, steps)
            self._assign()
            self.cond.notify_all()
        log.info("job %s submitted: %d sites, %d steps", spec.job_id, len(sites), steps)
        return spec.job_id

    def cancel(self, job_id: str) -> JobRun:
        with self.lock:
            job = self.job(job_id)
            if job.state in ("waiting", "running"):
                job.state = "cancelled"
                self._snapshot(job)
                self._revoke(job_id, "cancelled")
            self.cond.notify_all()
            return job

    def job(self, job_id: str) -> JobRun:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}")
        return self.jobs[job_id]

    def adapter_params(self, job_id: str) -> dict:
        with self.lock:
            return {n: params_of(a) for n, a in self.host.jobs[job_id].adapters.items()}

    # workers

    def register(self, worker_id: str, capabilities: dict) -> str:
        with self.lock:
            w = self.workers.get(worker_id)
            if w is None:
                w = self.workers[worker_id] = WorkerState(worker_id, secrets.token_hex(8))
            w.capabilities = capabilities
            return w.session

    def connect(self, worker_id: str, session: str, progress: list[tuple[str, str, int, int]]) -> int:
        """A Work stream opened: resume from the worker's checkpointed progress; returns the stream id."""
        with self.lock:
            w = self.workers.get(worker_id)
            if w is None or not secrets.compare_digest(w.session, session):
                raise PermissionError(f"worker {worker_id!r} must Register before Work (unknown session)")
            w.stream += 1
            w.connected, w.left_at, w.credits = True, None, 0
            w.control = []
            for job_id, site, version, fitted in progress:
                key, job = (job_id, site), self.jobs.get(job_id)
                if job is not None and job.state in ("waiting", "running") and site in job.sites \
                        and key not in self.owner:
                    self.owner[key] = worker_id  # it holds this site's optimizer state: give it back
                if self.owner.get(key) == worker_id:
                    self._drop_fitted(w, job_id, site, fitted)
                else:  # reassigned while it was away, or the job ended
                    w.control.append(("revoke", job_id, [site], "no longer assigned to this worker"))
            for o in w.outbox:
                o.sent = False  # replay whatever is not yet fitted
            for (job_id, site), owner in sorted(self.owner.items()):
                if owner == worker_id:
                    w.control.append(("assign", job_id, [site]))
            self._assign()
            self.cond.notify_all()
            log.info("worker %s connected (stream %d), owns %d sites", worker_id, w.stream,
                     sum(1 for o in self.owner.values() if o == worker_id))
            return w.stream

    def disconnect(self, worker_id: str, stream: int) -> None:
        with self.lock:
            w = self.workers.get(worker_id)
            if w is not None and w.stream == stream:
                w.connected, w.left_at = False, time.monotonic()
                log.info("worker %s disconnected; its sites wait %.0f s before reassignment",
                         worker_id, self.reassign_after)
                self.cond.notify_all()

    def grant(self, worker_id: str, n: int) -> None:
        with self.lock:
            self.workers[worker_id].credits += n
            self.cond.notify_all()

    def next_message(self, worker_id: str, stream: int, timeout: float) -> tuple | None:
        """The next thing to send on a worker's stream, or None after `timeout` (send a heartbeat)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                w = self.workers[worker_id]
                if w.stream != stream or not w.connected or self._stop:
                    return ("closed",)
                if w.control:
                    kind, *rest = w.control.pop(0)
                    if kind == "assign":
                        return ("assign", self._assignment(*rest))
                    return (kind, *rest)
                if w.credits > 0:
                    for o in w.outbox:
                        if not o.sent:
                            o.sent = True
                            w.credits -= 1
                            return ("packets", o.job, o.step, list(o.packets))
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def receive_update(self, worker_id: str, update: Update, fitted_through: int) -> bool:
        """Check and queue an update; True if new. Raises PermissionError / ValueError / KeyError."""
        with self.lock:
            job = self.jobs.get(update.job)
            if job is None or self.owner.get((update.job, update.site)) != worker_id:
                # unknown and foreign jobs read the same: a worker learns nothing of other tenants
                raise PermissionError(f"worker {worker_id!r} is not assigned site `{update.site}` of job {update.job!r}")
            version, _ = job.received[update.site]
            if job.recovered and update.version > version + 1:
                version = update.version - 1  # after a server restart a worker may be ahead: full state, take it
            if update.version <= version:  # a replay of what we have: acknowledge again, change nothing
                self.workers[worker_id].control.append(("ack", update.job, update.site, version))
                self.cond.notify_all()
                return False
            if update.version != version + 1:
                raise ValueError(f"update of `{update.site}` has version {update.version}; expected {version + 1}")
            want = update.version * job.spec.fit_interval - 1
            if fitted_through != want:
                raise ValueError(f"update of `{update.site}` v{update.version} says it fitted through step "
                                 f"{fitted_through}; expected {want}")
            check_params(self.host.jobs[update.job].adapters[update.site], update.params)
            job.received[update.site] = (update.version, fitted_through)
            self._pending.append(update)
            self._drop_fitted(self.workers[worker_id], update.job, update.site, fitted_through)
            self.workers[worker_id].control.append(("ack", update.job, update.site, update.version))
            self.cond.notify_all()
            return True

    # the step loop

    def run(self, poll: float = 0.05) -> None:
        """Run steps until `stop()`; the server's one compute thread."""
        while not self._stop:
            if not self.step_once():
                with self.lock:
                    self.cond.wait(poll)

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.cond.notify_all()

    def step_once(self) -> bool:
        """Apply due updates, run one forward over every ready job, route packets; False if idle."""
        with self.lock:
            self._apply_pending()
            self._reassign_lost()
            ready = [j for j in self.jobs.values() if self._ready(j)]
            parts = []
            for job in ready:
                try:
                    parts.append((job.spec.job_id, next(job.data)))
                except StopIteration:
                    job.state, job.error = "failed", "its data ran out"
            ready = [self.jobs[j] for j, _ in parts]
            for job in ready:
                self._snapshot(job)
            used = {j.spec.job_id: dict(self.host.jobs[j.spec.job_id].versions) for j in ready}
        if not ready:
            return False
        t0 = time.perf_counter()
        try:
            result = self.host.step(collate(parts))
        except Exception as e:  # a bad batch or NaN fails its jobs, never the server
            with self.lock:
                for job in ready:
                    job.state, job.error = "failed", f"{type(e).__name__}: {e}"
                    self._revoke(job.spec.job_id, job.error)
                log.error("step failed for %s: %s", [j.spec.job_id for j in ready], e)
            return True
        log.debug("step of %s took %.3f s", [j.spec.job_id for j in ready], time.perf_counter() - t0)
        with self.lock:
            by_dest: dict[tuple[str, str], list[Packet]] = {}
            for p in result.packets:
                by_dest.setdefault((p.job, self.owner[(p.job, p.site)]), []).append(p)
            for (job_id, worker_id), packets in by_dest.items():
                job = self.jobs[job_id]
                for p in packets:
                    p.step = job.step
                self.workers[worker_id].outbox.append(Outgoing(job_id, job.step, packets))
            for job in ready:
                j = job.spec.job_id
                newest = max(v for v, _ in job.received.values())
                staleness = newest - min(used[j].values())
                job.max_staleness = max(job.max_staleness, staleness)
                job.losses.append(result.losses[j])
                job.metrics.append({"step": job.step, "loss": result.losses[j], "tokens": result.tokens[j],
                                    "staleness": staleness, "time": time.time()})
                job.step += 1
            self.cond.notify_all()
        return True

    def _ready(self, job: JobRun) -> bool:
        if job.state == "waiting" and all(k in self.owner for k in ((job.spec.job_id, s) for s in job.sites)):
            job.state = "running"
        if job.state != "running":
            return False
        if job.step >= job.steps:
            if all(self.host.jobs[job.spec.job_id].versions[s] >= job.final_version() for s in job.sites):
                job.state = "done"
                self._snapshot(job)
                self._revoke(job.spec.job_id, "done")
                log.info("job %s done after %d steps", job.spec.job_id, job.steps)
            return False
        versions = self.host.jobs[job.spec.job_id].versions
        return all(versions[s] >= job.need(job.step) for s in job.sites)

    def _snapshot(self, job: JobRun) -> None:
        if self.store is not None:
            hosted = self.host.jobs[job.spec.job_id]
            owners = {site: w for (j, site), w in self.owner.items() if j == job.spec.job_id}
            self.store.save_progress(job.spec.job_id, job.step, job.state, dict(hosted.versions),
                                     {n: params_of(a) for n, a in hosted.adapters.items()}, owners)

    def _restore(self) -> None:
        """Bring back every stored job at its last snapshot (a restarted server)."""
        for stored in self.store.load():
            spec = JobSpec.from_dict(stored["spec"])
            sites = self.host.add_job(spec)
            batches = from_map(stored["data"])
            job = JobRun(spec, stored["steps"], batches, {s.name: s for s in sites}, recovered=True)
            job.received = {s.name: (0, -1) for s in sites}
            prog = stored["progress"]
            if prog is not None:
                for site, params in prog["params"].items():
                    version = prog["versions"][site]
                    if version > 0:
                        self.host.apply(Update(spec.job_id, site, version, params, 0.0))
                    job.received[site] = (version, version * spec.fit_interval - 1)
                # resume at the first step no site has folded in yet: every later step recomputes
                # exactly (same data, same adapter versions) and workers skip what they already hold
                job.step = min(prog["step"], min(prog["versions"].values()) * spec.fit_interval)
                for _ in range(job.step):
                    next(batches)
                job.state = "waiting" if prog["state"] == "running" else prog["state"]
                for site, wid in prog["owners"].items():  # sticky: its worker has the optimizer state
                    if job.state == "waiting":
                        self.owner[(spec.job_id, site)] = wid
                        if wid not in self.workers:
                            self.workers[wid] = WorkerState(wid, secrets.token_hex(8), left_at=time.monotonic())
            self.jobs[spec.job_id] = job
            log.info("job %s restored at step %d (%s)", spec.job_id, job.step, job.state)

    def _apply_pending(self) -> None:
        for u in self._pending:
            self.host.apply(u)
        self._pending.clear()

    def _drop_fitted(self, w: WorkerState, job_id: str, site: str, fitted_through: int) -> None:
        for o in w.outbox:
            if o.job == job_id and o.step <= fitted_through:
                o.packets = [p for p in o.packets if p.site != site]
        w.outbox = [o for o in w.outbox if o.packets]

    # assignment

    def _assign(self) -> None:
        """Give every unowned site of a live job to the connected worker with the fewest sites."""
        live = [w for w in self.workers.values() if w.connected]
        if not live:
            return
        load = {w.worker_id: sum(1 for o in self.owner.values() if o == w.worker_id) for w in live}
        for job_id, job in self.jobs.items():
            if job.state not in ("waiting", "running"):
                continue
            new: dict[str, list[str]] = {}
            for site in job.sites:
                if (job_id, site) not in self.owner:
                    wid = min(load, key=lambda k: (load[k], k))
                    self.owner[(job_id, site)] = wid
                    load[wid] += 1
                    new.setdefault(wid, []).append(site)
            for wid, sites in new.items():
                self.workers[wid].control.append(("assign", job_id, sites))
                log.info("assigned job %s sites %d -> worker %s", job_id, len(sites), wid)

    def _assignment(self, job_id: str, sites: list[str]) -> dict:
        job, hosted = self.jobs[job_id], self.host.jobs[job_id]
        return {"job": job_id, "spec": job.spec, "sites": [
            (job.sites[s], hosted.versions[s], params_of(hosted.adapters[s])) for s in sites]}

    def _reassign_lost(self) -> None:
        """Sites of a worker gone longer than `reassign_after` move, with their unfitted packets.

        The new owner starts from the server's parameters with a fresh optimizer state: the run
        goes on, but its trajectory is no longer the failure-free one.
        """
        now = time.monotonic()
        gone = {w.worker_id for w in self.workers.values()
                if not w.connected and w.left_at is not None and now - w.left_at >= self.reassign_after}
        if not gone or not any(w.connected for w in self.workers.values()):
            return
        moved: list[Packet] = []
        for (job_id, site), wid in list(self.owner.items()):
            if wid in gone:
                del self.owner[(job_id, site)]
                moved += [p for o in self.workers[wid].outbox if o.job == job_id for p in o.packets if p.site == site]
        for wid in gone:
            self.workers[wid].outbox = []
            log.warning("worker %s gone for %.0f s: reassigning its sites", wid, now - self.workers[wid].left_at)
        self._assign()
        for p in sorted(moved, key=lambda p: p.step):
            self.workers[self.owner[(p.job, p.site)]].outbox.append(Outgoing(p.job, p.step, [p]))

    def _revoke(self, job_id: str, reason: str) -> None:
        for (j, site), wid in list(self.owner.items()):
            if j == job_id:
                self.workers[wid].control.append(("revoke", job_id, [site], reason))
                del self.owner[(j, site)]
        for w in self.workers.values():
            w.outbox = [o for o in w.outbox if o.job != job_id]

    def health(self) -> dict:
        with self.lock:
            return {"workers": sum(w.connected for w in self.workers.values()), "jobs": len(self.jobs)}
