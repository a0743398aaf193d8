"""The coordinator: a thread and a lock around the scheduler, the host and the jobs' data.

The gRPC servicers (`service.py`) only parse, check and call these methods; every read and
write of scheduler state happens under the one lock, and what leaves it is a typed snapshot.
The step loop runs `Host.step` outside the lock, so workers keep streaming while it computes.

Each step runs one job's batch (round-robin over the ready jobs): a job's packets then depend on
its own data and adapters only, so a run is bit-for-bit deterministic whoever shares the server.
`mix=True` runs every ready job in one mixed forward instead (more throughput on a GPU; a job's
trajectory then matches its solo run up to float rounding). A failed mixed step is retried job
by job, so only the job that caused it fails.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from colaflow.adapters import Adapter
from colaflow import evaluate
from colaflow.classify import classification_spec
from colaflow.data import check_limits, collate, from_map
from colaflow.errors import ResourceExhausted
from colaflow.host import Host
from colaflow.loss import causal_lm
from colaflow.job import JobSpec
from colaflow.protocol import Hello, ToServer, ToWorker
from colaflow.records import LIVE, StepPlan
from colaflow.scheduler import Abandoned, Scheduler
from colaflow.store import Store

log = logging.getLogger("colaflow.server")
RATE_WINDOW_S = 30.0  # a worker's fits/s are its fits in this many seconds, divided by them


@dataclass
class JobStatus:
    job: str
    state: str
    step: int
    steps: int
    versions: dict[str, int]
    loss: float
    error: str
    max_staleness: int
    workers: list[str] = field(default_factory=list)  # owners of the job's sites now


@dataclass
class Health:
    status: str  # "serving", or why not
    workers: int
    jobs: int


@dataclass
class Export:
    """What an export needs, copied out under the lock: spec, adapters, versions."""

    spec: JobSpec
    adapters: dict[str, Adapter]
    versions: dict[str, int] = field(default_factory=dict)


class Closed(Exception):
    """The worker's connection is no longer the live one (or the server stops)."""


class Coordinator:
    def __init__(self, host: Host, reassign_after: float = 30.0, store: Store | None = None, mix: bool = False,
                 layered: bool = True, max_tenant_jobs: int = 32):
        self.host, self.mix, self.layered = host, mix, layered
        self.max_tenant_jobs = max_tenant_jobs  # live jobs one tenant may hold: each holds server memory
        self.layer_wait = 60.0  # seconds a layered step waits for its versions before it starts over
        self._unused: dict[str, tuple[int, dict]] = {}  # job -> (step, batch) of a step that was abandoned
        self._abandoned: dict[str, int] = {}  # job -> the step last said to be abandoned (said once)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.listeners: list = []  # called (under the lock) whenever workers may have something new
        self.scheduler = Scheduler(store, reassign_after)
        self.data: dict[str, Iterator[dict]] = {}
        self.evals: dict[str, evaluate.EvalSet] = {}  # job -> its eval set (from its data map's `eval`)
        self.loop_error = ""
        self.fatal = ""  # set when the step loop gave up: the process should exit non-zero
        self._turn = 0
        self._stop = False
        for job in self.scheduler.jobs.values():  # restored from the state dir
            if job.state in LIVE:
                self._host_job(job.spec, job.data, skip=job.t, init=job.init)
                self._watch(job.job_id, evaluate.parse(job.data.get("eval")))

    def _host_job(self, spec: JobSpec, data: dict, skip: int = 0, init: dict | None = None) -> None:
        batches = from_map(data)
        for _ in range(skip):  # the same map always yields the same batches
            next(batches)
        self.host.add_job(spec, init)
        self.data[spec.job_id] = batches

    def _watch(self, job_id: str, ev: "evaluate.EvalSet | None") -> None:
        if ev is not None:
            self.evals[job_id] = ev
            self.scheduler.job(job_id).watch = ev.watch

    def _notify(self) -> None:
        self.cond.notify_all()
        for listener in self.listeners:
            listener()

    # control

    def submit(self, spec: JobSpec, data: dict, steps: int, tenant: str = "default",
               init: dict[str, dict] | None = None) -> str:
        """Host and schedule a job for `tenant`; `data` is a data map (see `colaflow.data.from_map`);
        `init` ({site: params}, see `colaflow.export.init_params`): where its adapters start."""
        batches = from_map(data)  # refuse bad data before anything is allocated
        check_limits(data, *self.host.limits())
        spec = classification_spec(spec, self.host.model)  # a classifier's head trains too
        ev = evaluate.parse(data.get("eval"), *self.host.limits(), causal=self.host.loss_fn is causal_lm)
        resolved = self.host.resolve(spec)  # before the lock: a target regex takes time, other tenants none
        with self.lock:
            if spec.job_id in self.scheduler.jobs:
                raise ValueError(f"job {spec.job_id!r} already exists")
            live = sum(j.tenant == tenant and j.state in LIVE for j in self.scheduler.jobs.values())
            if live >= self.max_tenant_jobs:
                raise ResourceExhausted(f"tenant {tenant!r} has {live} live jobs, the server's limit "
                                        "(--max-tenant-jobs): wait for one to end, or cancel one")
            sites = self.host.add_job(spec, init, resolved)
            try:
                self.scheduler.add_job(spec, sites, steps, data, tenant, init)
            except BaseException:
                self.host.remove_job(spec.job_id)
                raise
            self.data[spec.job_id] = batches
            self._watch(spec.job_id, ev)
            self._notify()
        log.info("job %s submitted: %d sites, %d steps", spec.job_id, len(sites), steps)
        return spec.job_id

    def _job(self, job_id: str, tenant: str | None):
        """The job, if `tenant` may see it (None: admin). Another tenant's job reads as unknown."""
        job = self.scheduler.job(job_id)
        if tenant is not None and job.tenant != tenant:
            raise KeyError(f"unknown job {job_id!r}")
        return job

    def cancel(self, job_id: str, tenant: str | None = None) -> JobStatus:
        with self.lock:
            self._job(job_id, tenant)
            self.scheduler.cancel(job_id, "cancelled")
            self._notify()
            return self._status(job_id)

    def status(self, job_id: str, tenant: str | None = None) -> JobStatus:
        with self.lock:
            self._job(job_id, tenant)
            return self._status(job_id)

    def statuses(self, tenant: str | None = None) -> list[JobStatus]:
        with self.lock:
            return [self._status(j) for j, job in self.scheduler.jobs.items() if tenant in (None, job.tenant)]

    def _status(self, job_id: str) -> JobStatus:
        job = self.scheduler.job(job_id)
        return JobStatus(job_id, job.state, job.t, job.steps or 0, {n: r.received for n, r in job.sites.items()},
                         job.losses[-1] if job.losses else 0.0, job.error, job.max_staleness,
                         sorted({r.owner for r in job.sites.values() if r.owner is not None}))

    def metrics(self, job_id: str, since: int, timeout: float, tenant: str | None = None) -> tuple[list[dict], bool]:
        """Metrics after the first `since`, waiting up to `timeout` for some; and whether the job ended."""
        deadline = time.monotonic() + timeout
        with self.lock:
            job = self._job(job_id, tenant)
            while len(job.metrics) <= since and job.state in LIVE and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))
            return [dict(m) for m in job.metrics[since:]], job.state not in LIVE

    def export(self, job_id: str, tenant: str | None = None, which: str = "last") -> Export:
        """The job's adapters: `last` (the newest version) or `best` (those of the best eval step)."""
        with self.lock:
            job = self._job(job_id, tenant)
            return Export(job.spec, self.scheduler.adapters(job_id, which), self.scheduler.versions(job_id, which))

    def max_update_bytes(self) -> int:
        with self.lock:
            return self.scheduler.max_update_bytes()

    def codecs(self, job_id: str) -> tuple[str, str]:
        with self.lock:
            spec = self.scheduler.job(job_id).spec
            return spec.codec_x, spec.codec_g

    def health(self, tenant: str | None = None) -> Health:
        """Serving or why not; workers connected; the jobs `tenant` sees (None: all)."""
        with self.lock:
            workers = sum(w.connected for w in self.scheduler.workers.values())
            jobs = sum(tenant in (None, j.tenant) for j in self.scheduler.jobs.values())
            return Health(self._trouble() or "serving", workers, jobs)

    def jobs_view(self, tenant: str | None = None) -> list[dict]:
        """Every job `tenant` sees (None: all), for the status page and /metrics: its status, owner,
        counters, queue depths (packets kept until durable state covers them; of those, not yet sent
        to a connected owner) and its last 20 metrics."""
        with self.lock:
            out = []
            for job_id, job in self.scheduler.jobs.items():
                if tenant not in (None, job.tenant):
                    continue
                unsent = 0
                for name, rec in job.sites.items():
                    w = self.scheduler.workers.get(rec.owner) if rec.owner is not None else None
                    cursor = w.cursor.get((job_id, name), -1) if w is not None and w.connected else -1
                    unsent += sum(step > cursor for step in rec.retained)
                view = vars(self._status(job_id))
                view.update(tenant=job.tenant, fits=job.fits, bytes_sent=job.bytes_sent,
                            bytes_received=job.bytes_received, packets_unsent=unsent,
                            packets_retained=sum(len(r.retained) for r in job.sites.values()),
                            recent=[dict(m) for m in job.metrics[-20:]])
                out.append(view)
            return out

    def workers_view(self) -> list[dict]:
        """Every worker the server knows, for the status page and `colaflow workers`: `worker`, `state`
        (connected, unhealthy, disconnected, quarantined; `detail` says why), `last_seen_s`, `sites`
        {job: [site, ...]} of live jobs, `fits_per_s` (over the last RATE_WINDOW_S), `bytes_in` (its
        updates' wire bytes, to the server) and `bytes_out` (packets' wire bytes, to it)."""
        with self.lock:
            now = self.scheduler.clock()
            owned: dict[str, dict[str, list[str]]] = {}
            for job_id, job in self.scheduler.jobs.items():
                for name, rec in job.sites.items():
                    if rec.owner is not None and job.state in LIVE:
                        owned.setdefault(rec.owner, {}).setdefault(job_id, []).append(name)
            out = []
            for w in sorted(self.scheduler.workers.values(), key=lambda w: w.worker_id):
                state = ("quarantined" if w.quarantined else "disconnected" if not w.connected
                         else "unhealthy" if w.status else "connected")
                out.append({"worker": w.worker_id, "state": state, "detail": w.quarantined or w.status,
                            "last_seen_s": None if w.last_seen is None else max(0.0, now - w.last_seen),
                            "sites": owned.get(w.worker_id, {}),
                            "fits_per_s": sum(now - t <= RATE_WINDOW_S for t in w.fit_times) / RATE_WINDOW_S,
                            "bytes_in": w.bytes_in, "bytes_out": w.bytes_out})
            return out

    def heard(self, worker_id: str) -> None:
        """A frame (a chunk of a long upload, say) came from the worker: it is alive. No lock: one store."""
        w = self.scheduler.workers.get(worker_id)
        if w is not None:
            w.last_seen = self.scheduler.clock()

    def _seen(self, worker_id: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Under the lock: the worker was heard from now (and moved these wire bytes)."""
        w = self.scheduler.workers.get(worker_id)
        if w is not None:
            w.last_seen = self.scheduler.clock()
            w.bytes_in += bytes_in
            w.bytes_out += bytes_out

    def _trouble(self) -> str:
        if self.loop_error:
            return f"step loop failing: {self.loop_error}"
        if self.scheduler.store_error:
            return f"state dir failing (retrying): {self.scheduler.store_error}"
        return ""

    # workers

    def register(self, worker_id: str, capabilities: dict, credential: str = "") -> str:
        with self.lock:
            return self.scheduler.register(worker_id, capabilities, credential)

    def connect(self, worker_id: str, session: str, hello: Hello) -> int:
        with self.lock:
            stream = self.scheduler.connect(worker_id, session, hello)
            self._seen(worker_id)
            self._notify()
            return stream

    def disconnect(self, worker_id: str, stream: int, leaving: bool = False) -> None:
        with self.lock:
            self.scheduler.disconnect(worker_id, stream, leaving)
            self._notify()

    def grant(self, worker_id: str, stream: int, n: int) -> None:
        with self.lock:
            self.scheduler.grant(worker_id, stream, min(n, 1024))
            self._seen(worker_id)
            self._notify()

    def worker_status(self, worker_id: str, stream: int, status: str) -> None:
        """A worker's own word on its health ("" = healthy), from its heartbeats."""
        with self.lock:
            w = self.scheduler.workers.get(worker_id)
            if w is None or w.stream != stream:
                return
            self._seen(worker_id)
            if w.status == status:
                return
            w.status = status
        if status:
            log.warning("worker %s is unhealthy: %s", worker_id, status)
        else:
            log.info("worker %s is healthy again", worker_id)

    def receive(self, worker_id: str, msg: ToServer, nbytes: int = 0) -> None:
        with self.lock:
            self.scheduler.receive(worker_id, msg)
            self.scheduler.count_bytes(msg.job, received=nbytes)
            self._seen(worker_id, bytes_in=nbytes)
            self._notify()

    def fail(self, job_id: str, reason: str) -> None:
        with self.lock:
            self.scheduler.fail(job_id, reason)
            self._notify()

    def sent(self, job_id: str, nbytes: int, worker_id: str = "") -> None:
        """Packet bytes went out on the wire, for `job_id`, to `worker_id`."""
        with self.lock:
            self.scheduler.count_bytes(job_id, sent=nbytes)
            w = self.scheduler.workers.get(worker_id)
            if w is not None:
                w.bytes_out += nbytes

    def next_message(self, worker_id: str, stream: int, timeout: float) -> ToWorker | None:
        """The next message for the worker's stream, or None after `timeout`; raises Closed."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                if self._stop or not self.scheduler.current(worker_id, stream):
                    raise Closed(worker_id)
                msg = self.scheduler.next_message(worker_id, stream)
                if msg is not None:
                    return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    # the step loop

    def run(self, poll: float = 0.05, max_failures: int = 30) -> None:
        """Run steps until `stop()`; the server's one compute thread. One error fails one job, never the
        loop; if the loop itself fails `max_failures` times in a row, it stops and says so (`fatal`)."""
        failures = 0
        while not self._stop:
            try:
                busy = self.step_once()
                self.loop_error, failures = "", 0
            except Exception as e:  # a bug: say so loudly, keep serving the other jobs
                log.exception("step loop error")
                self.loop_error, busy, failures = f"{type(e).__name__}: {e}", False, failures + 1
                if failures >= max_failures:
                    self.fatal = f"the step loop failed {failures} times in a row: {self.loop_error}"
                    log.critical("%s; stopping", self.fatal)
                    self.stop()
                    return
                time.sleep(1.0)
            if not busy:
                with self.lock:
                    self.cond.wait(poll)

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self._notify()

    def step_once(self) -> bool:
        """Run the next step (of one ready job, or of all with `mix`); False if nothing was ready."""
        with self.lock:
            for job_id in self.scheduler.take_ended():
                self.data.pop(job_id, None)
                self.evals.pop(job_id, None)
                self._unused.pop(job_id, None)
                if job_id in self.host.jobs:
                    self.host.remove_job(job_id)  # a finished job's adapters live on in the scheduler
            ready, layered = self.scheduler.ready(), False
            if not ready and self.layered and not self.mix:  # start a step while its lower layers still fit
                ready, layered = self.scheduler.ready(layered=True), True
            if not ready:
                self._notify()  # ready() may have moved a lost worker's sites
                return False
            if not self.mix:
                self._turn += 1
                ready = [ready[self._turn % len(ready)]]
            work = []
            for job_id in ready:
                try:
                    held = self._unused.pop(job_id, None)  # an abandoned step's batch: step t keeps batch t
                    batch = held[1] if held and held[0] == self.scheduler.job(job_id).t else next(self.data[job_id])
                except StopIteration:
                    self.scheduler.fail(job_id, "its data ran out")
                    continue
                except Exception as e:  # a data map that cannot make a batch fails its job, not the loop
                    log.exception("job %s: its data failed", job_id)
                    self.scheduler.fail(job_id, f"its data failed: {type(e).__name__}: {e}")
                    continue
                plan = self.scheduler.begin(job_id, layered)
                for update in plan.apply:
                    self.host.apply(update)
                work.append((plan, batch))
        self._run(work)
        with self.lock:
            self._notify()
        return True

    def _run(self, work: list[tuple[StepPlan, dict]]) -> None:
        if not work:
            return
        t0 = time.perf_counter()
        alone = work[0][0] if len(work) == 1 else None
        try:
            # one job: its packets go to their owners as the backward makes them, and the forward
            # waits at each site still fitting; a mixed step publishes at its end (a retry stays clean)
            result = self.host.step(collate([(plan.job, batch) for plan, batch in work]),
                                    emit=None if alone is None else (lambda p: self._publish(alone, p)),
                                    gate=None if alone is None or not alone.waiting else self._gate(alone))
        except Abandoned as e:
            if alone is None or self._abandoned.get(alone.job) != alone.step:
                log.info("%s", e)  # once per step: a job waiting on a device is retried many times a second
            if alone is not None:
                self._abandoned[alone.job] = alone.step
            with self.lock:
                for plan, batch in work:
                    self._unused[plan.job] = (plan.step, batch)
            return
        except Exception as e:
            if len(work) > 1:  # find the culprit: every job alone
                log.warning("mixed step of %s failed (%s); retrying them one by one", [p.job for p, _ in work], e)
                for one in work:
                    self._run([one])
                return
            plan = work[0][0]
            log.exception("step %d of job %s failed", plan.step, plan.job)  # bad input or a bug: the traceback tells
            with self.lock:
                self.scheduler.fail(plan.job, f"step {plan.step} failed: {type(e).__name__}: {e}")
            return
        seconds = time.perf_counter() - t0
        evals = {plan.job: self._evaluate(plan) for plan, _ in work}  # the packets are out: devices fit meanwhile
        with self.lock:
            for plan, _ in work:
                packets = [p for p in result.packets if p.job == plan.job]
                self.scheduler.finish(plan, packets, result.losses[plan.job], result.tokens[plan.job], seconds,
                                      evals[plan.job])

    def _evaluate(self, plan: StepPlan) -> dict[str, float] | None:
        """The step's eval metrics if it is an eval step, with the versions the step used (they are still
        loaded); a failing eval fails its job, not the loop."""
        ev, job = self.evals.get(plan.job), self.scheduler.jobs.get(plan.job)
        if ev is None or job is None or not ev.due(plan.step, job.steps):
            return None
        try:
            return evaluate.evaluate(self.host, plan.job, ev)
        except Exception as e:
            log.exception("eval of job %s at step %d failed", plan.job, plan.step)
            with self.lock:
                self.scheduler.fail(plan.job, f"eval at step {plan.step} failed: {type(e).__name__}: {e}")
            return None

    def _publish(self, plan: StepPlan, packets: list) -> None:
        with self.lock:  # one group at a time: sites that share an input leave in one frame
            for p in packets:
                self.scheduler.publish(plan, p)
            self._notify()

    def _gate(self, plan: StepPlan):
        """Block the forward at a site until its version is in, then load it (layered start). The step
        is abandoned (and runs again later, with the same batch) after `layer_wait` seconds, when
        the server stops, or when another job becomes ready: a waiting job never holds others up."""
        waiting = set(plan.waiting)
        deadline = time.monotonic() + self.layer_wait

        def gate(site: str) -> None:
            if site not in waiting:
                return
            with self.lock:
                while (update := self.scheduler.arrived(plan, site)) is None:
                    others = [j for j in self.scheduler.ready() if j != plan.job]  # also moves a lost worker's sites
                    self._notify()
                    if self._stop or others or time.monotonic() > deadline:
                        why = "the server stops" if self._stop else f"{others[0]} is ready" if others else "timeout"
                        raise Abandoned(f"step {plan.step} of job {plan.job} stopped waiting for `{site}` ({why})")
                    self.cond.wait(0.05)
            waiting.discard(site)
            self.host.apply(update)
        return gate
