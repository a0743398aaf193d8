"""The coordinator: the server's step loop around the host, the scheduler and the jobs' data.

The scheduler locks itself (servicers, the status page and this loop all call it directly); the
coordinator holds the scheduler's lock only where its own state changes with it — a submit
(host, scheduler and data all or nothing), the start of a step (ended jobs let go, the next plan
and its loads). The step loop runs `Host.step` outside the lock, so workers keep streaming while
it computes.

Each step runs one job's batch: a job's packets then depend on its own data and adapters only, so
a run is bit-for-bit deterministic whoever shares the server. The loop's time is shared fairly: the
next unit of work — a step, or one slice of an eval — goes to the job that has used the least
compute (a job back from waiting starts level with the others), and a job's eval counts in its own
share: it runs a batch at a time between other jobs' steps, and the job's next step waits for it.
`mix=True` runs every ready job in one mixed forward instead (more throughput on a GPU; a job's
trajectory then matches its solo run up to float rounding). A failed mixed step is retried job
by job, so only the job that caused it fails.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from colaflow.control.admission import admit, prepare
from colaflow.control.records import LIVE, StepPlan
from colaflow.control.retention import KEEP_ALL, Policy
from colaflow.control.scheduler import Abandoned, Scheduler
from colaflow.control.store import Store
from colaflow.data.batches import collate, from_map
from colaflow.engine import evaluate
from colaflow.engine.host import Host
from colaflow.errors import ResourceExhausted
from colaflow.job import JobSpec

from . import heap

log = logging.getLogger("colaflow.server")


@dataclass
class Health:
    status: str  # "serving", or why not
    workers: int
    jobs: int


@dataclass
class _Eval:
    """A finished step whose eval is still running: the step is recorded once its eval is done."""

    plan: StepPlan
    loss: float
    tokens: int
    seconds: float
    run: evaluate.Evaluation = field(repr=False)


class Coordinator:
    def __init__(self, host: Host, reassign_after: float = 30.0, store: Store | None = None, mix: bool = False,
                 layered: bool = True, max_tenant_jobs: int = 32, policy: Policy = KEEP_ALL):
        self.host, self.mix, self.layered = host, mix, layered
        self.max_tenant_jobs = max_tenant_jobs  # live jobs one tenant may hold: each holds server memory
        self.layer_wait = 60.0  # seconds a layered step waits for its versions before it starts over
        self._unused: dict[str, tuple[int, dict]] = {}  # job -> (step, batch) of a step that was abandoned
        self._abandoned: dict[str, int] = {}  # job -> the step last said to be abandoned (said once)
        self.scheduler = Scheduler(store, reassign_after, policy=policy)
        self.lock = self.scheduler.lock  # one lock: the scheduler's, held for the host and data changes too
        self.data: dict[str, Iterator[dict]] = {}
        self.evals: dict[str, evaluate.EvalSet] = {}  # job -> its eval set (from its data map's `eval`)
        self._evaluating: dict[str, _Eval] = {}  # job -> its eval under way (its next step waits for it)
        self._used: dict[str, float] = {}  # job -> compute seconds of the loop it has used (its share)
        self._vclock = 0.0  # the share of the job served last: one back from waiting starts here
        self.loop_error = ""
        self.fatal = ""  # set when the step loop gave up: the process should exit non-zero
        self._turn = 0
        self.stopping = False
        for job in self.scheduler.jobs.values():  # restored from the state dir
            if job.state in LIVE:
                batches = from_map(job.data)
                for _ in range(job.t):  # the same map always yields the same batches
                    next(batches)
                self.host.add_job(job.spec, job.init)
                self.data[job.job_id] = batches
                ev = evaluate.parse(job.data.get("eval"))
                if ev is not None:
                    self.evals[job.job_id] = ev
                    self.scheduler.watch(job.job_id, ev.watch)

    def submit(self, spec: JobSpec, data: dict, steps: int, tenant: str = "default",
               init: bytes | dict[str, dict] | None = None, data_bytes: int = 0) -> str:
        """Host and schedule a job for `tenant`; `data` is a data map (see `colaflow.data.from_map`) of
        `data_bytes` packed (what the tenant's state-dir quota counts); `init`: where its adapters start,
        a packed export (`colaflow.export.init_blob`, checked against the job's sites) or {site: params}."""
        a = prepare(self.host, spec, data, init=init)  # checks and site resolution, outside the lock
        with self.lock:
            if a.spec.job_id in self.scheduler.jobs:
                raise ValueError(f"job {a.spec.job_id!r} already exists")
            live = sum(j.tenant == tenant and j.state in LIVE for j in self.scheduler.jobs.values())
            if live >= self.max_tenant_jobs:
                raise ResourceExhausted(f"tenant {tenant!r} has {live} live jobs, the server's limit "
                                        "(--max-tenant-jobs): wait for one to end, or cancel one")
            self.scheduler.check_quota(tenant, data_bytes)
            record = admit(self.host, self.scheduler, a, steps, tenant, None, data)
            self.data[a.spec.job_id] = a.batches
            if a.evals is not None:
                self.evals[a.spec.job_id] = a.evals
        log.info("job %s submitted: %d sites, %d steps", a.spec.job_id, len(record.sites), steps)
        return a.spec.job_id

    def health(self, tenant: str | None = None) -> Health:
        """Serving or why not; workers connected; the jobs `tenant` sees (None: all)."""
        workers, jobs = self.scheduler.counts(tenant)
        return Health(self._trouble() or "serving", workers, jobs)

    def _trouble(self) -> str:
        if self.loop_error:
            return f"step loop failing: {self.loop_error}"
        if self.scheduler.store_error:
            return f"state dir failing (retrying): {self.scheduler.store_error}"
        full = self.scheduler.store.trouble()
        return f"state dir failing: {full}" if full else ""

    # the step loop

    def run(self, poll: float = 0.05, max_failures: int = 30) -> None:
        """Run steps until `stop()`; the server's one compute thread. One error fails one job, never the
        loop; if the loop itself fails `max_failures` times in a row, it stops and says so (`fatal`)."""
        failures = 0
        while not self.stopping:
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
                    self.scheduler.changed.wait(poll)

    def stop(self) -> None:
        self.stopping = True
        self.scheduler.notify()  # waiting steps and streams look again, and see it

    def step_once(self) -> bool:
        """Run the next unit of work: a step of the ready job whose share is least used (of every ready
        job with `mix`), or a slice of an eval under way; False if there was nothing to do."""
        with self.lock:
            ended = self.scheduler.take_ended()
            for job_id in ended:  # everything kept for a live job goes
                for kept in (self.data, self.evals, self._unused, self._abandoned, self._evaluating, self._used):
                    kept.pop(job_id, None)
                if job_id in self.host.jobs:
                    self.host.remove_job(job_id)  # a finished job's adapters live on in the scheduler
            if ended:
                heap.trim()  # its data's memory goes back to the OS, not only to the heap
            ready, layered = self._ready(), False
            if not ready and not self._evaluating and self.layered and not self.mix:
                ready, layered = self._ready(layered=True), True  # start a step while its lower layers still fit
            if not ready and not self._evaluating:
                return False
            if self.mix:
                slices = list(self._evaluating)  # one slice of each eval beside the mixed step
            else:
                pick = self._fair(ready + list(self._evaluating))
                ready, slices = ([], [pick]) if pick in self._evaluating else ([pick], [])
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
                plan = self.scheduler.begin(job_id, layered, held=self.host.versions(job_id))
                for load in plan.apply:
                    self.host.apply(load)
                work.append((plan, batch))
        self._run(work)
        for job_id in slices:
            self._eval_slice(job_id)
        return True

    def _ready(self, layered: bool = False) -> list[str]:
        """The scheduler's ready jobs, less those whose eval is under way (their step is not recorded yet)."""
        return [j for j in self.scheduler.ready(layered=layered) if j not in self._evaluating]

    def _fair(self, candidates: list[str]) -> str:
        """The candidate whose share of the loop is least used; one back from waiting starts level
        with the job served last, so time spent waiting is no credit."""
        for j in candidates:
            self._used[j] = max(self._used.get(j, self._vclock), self._vclock)
        self._turn += 1
        n = len(candidates)
        pick = min(range(n), key=lambda i: (self._used[candidates[i]], (i - self._turn) % n))  # ties: in turn
        self._vclock = self._used[candidates[pick]]
        return candidates[pick]

    def _charge(self, job_id: str, seconds: float) -> None:
        if job_id in self._used:
            self._used[job_id] += seconds

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
                                    gate=None if alone is None or not alone.waiting else self._gate(alone),
                                    steps={plan.job: plan.step for plan, _ in work})
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
            self.scheduler.fail(plan.job, f"step {plan.step} failed: {type(e).__name__}: {e}")
            return
        seconds = time.perf_counter() - t0
        with self.lock:  # one step's jobs finish together; a job with an eval due finishes after it
            for plan, _ in work:
                self._charge(plan.job, seconds / len(work))
                packets = [p for p in result.packets if p.job == plan.job]
                ev, job = self.evals.get(plan.job), self.scheduler.jobs.get(plan.job)
                if ev is None or job is None or job.state != "running" or not ev.due(plan.step, job.steps):
                    self.scheduler.finish(plan, packets, result.losses[plan.job], result.tokens[plan.job], seconds)
                    continue
                for p in packets:  # the packets are out: devices fit while the eval runs
                    self.scheduler.publish(plan, p)
                self._evaluating[plan.job] = _Eval(plan, result.losses[plan.job], result.tokens[plan.job], seconds,
                                                   evaluate.Evaluation(ev))

    def _eval_slice(self, job_id: str) -> None:
        """One batch of a job's eval, with the versions its step used (still loaded: the job steps no
        further meanwhile); once done, the step is recorded with the eval's metrics. A failing eval
        fails its job, not the loop."""
        pending = self._evaluating.get(job_id)
        if pending is None:
            return
        t0 = time.perf_counter()
        try:
            done = pending.run.step(self.host, job_id)
        except Exception as e:
            log.exception("eval of job %s at step %d failed", job_id, pending.plan.step)
            with self.lock:
                self._evaluating.pop(job_id, None)
                self.scheduler.fail(job_id, f"eval at step {pending.plan.step} failed: {type(e).__name__}: {e}")
            return
        self._charge(job_id, time.perf_counter() - t0)
        if done:
            with self.lock:
                self._evaluating.pop(job_id, None)
                self.scheduler.finish(pending.plan, [], pending.loss, pending.tokens, pending.seconds,
                                      pending.run.result)

    def _publish(self, plan: StepPlan, packets: list) -> None:
        with self.lock:  # one group at a time: sites that share an input leave in one frame
            for p in packets:
                self.scheduler.publish(plan, p)

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
                while (load := self.scheduler.arrived(plan, site)) is None:
                    others = [j for j in self._ready() if j != plan.job]  # also moves a lost worker's sites
                    if self.stopping or others or time.monotonic() > deadline:
                        why = "the server stops" if self.stopping else f"{others[0]} is ready" if others else "timeout"
                        raise Abandoned(f"step {plan.step} of job {plan.job} stopped waiting for `{site}` ({why})")
                    self.scheduler.changed.wait(0.05)
            waiting.discard(site)
            self.host.apply(load)
        return gate
