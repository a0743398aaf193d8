"""The scheduler: the server's transport-free state machine. Plain objects, an injected clock.

It decides which job steps when, which adapter version each step uses, what goes to which worker,
and what is acknowledged. It never computes (the driver runs `Host.step`) and never does I/O
except through its `Store`. Drivers: `colaflow.control.trainer.Trainer` (in-process, synchronous
delivery) and the server's coordinator (a step thread, gRPC pumps to the workers). It locks itself,
so any thread may call it; `listeners` hear of every change that may give a worker something new.

    s = Scheduler(store, reassign_after=30.0, clock=time.monotonic)
    s.add_job(spec, sites, steps)                  # sites from Host.add_job
    session = s.register("w1"); stream = s.connect("w1", session, Hello())
    for job in s.ready():
        plan = s.begin(job, held=host.versions(job))   # host.apply(l) for l in plan.apply; then the step
        s.finish(plan, packets, loss, tokens)      # packets are kept until durable state covers them
    msg = s.next_message("w1", stream)             # Assign | Packets | Ack | Revoke, or None
    s.receive("w1", update)                        # Update | Refusal from the worker

Its rules live by idea: `planning` (steps and their versions), `placement` (who owns which site),
`delivery` (credits, packets, updates, acks), `progress` (the store, restarts), `retention` (ended
jobs: what they keep, how long), `views` (what operators see); `records` holds its state,
`acceptance` the checks an update must pass.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..adapters.base import build_adapter, param_shapes
from ..job import JobSpec, check_steps
from ..learn.fit import site_seed
from ..sites import Site
from .acceptance import check_init, optimizer_skeleton
from .delivery import Delivery
from .lock import changes, locked
from .placement import FIT_TIMEOUT_S, Placement
from .planning import Abandoned, Planning
from .progress import Progress
from .records import JobRecord, JobWeights, SiteRecord, Watch, WorkerRecord
from .retention import KEEP_ALL, Policy, Retention
from .store import Store, pack_params
from .views import Views

__all__ = ["MAX_FIT_INTERVAL", "Abandoned", "Scheduler"]
MAX_FIT_INTERVAL = 256


class Scheduler(Planning, Placement, Delivery, Progress, Retention, Views):
    def __init__(self, store: Store | None = None, reassign_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, max_workers: int = 10_000,
                 policy: Policy = KEEP_ALL):
        self.store = store if store is not None else Store()
        self.policy, self._swept_at = policy, None  # how long ended jobs are kept (retention.py)
        self.reassign_after, self.max_workers = reassign_after, max_workers
        self.fit_timeout = max(FIT_TIMEOUT_S, 10 * reassign_after)  # a connected worker's, per job (see _move_stalled)
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified with the listeners
        self.listeners: list[Callable[[], None]] = []  # called, under the lock, after every change
        self.jobs: dict[str, JobRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self._ended: list[str] = []
        self._max_update: int | None = None  # cached; recomputed when jobs come or go
        self.store_error = ""  # why the store last failed ("" when it works): no step runs meanwhile
        self._dirty: set[str] = set()  # jobs whose progress the store has not taken yet
        self._rewrite: set[str] = set()  # jobs whose metric rows a restart cut back (progress.py)
        self.quarantined: dict[str, str] = {}  # worker id -> why it gets no work
        self._store_failures, self._store_retry_at = 0, 0.0
        self._restore()

    def _changed(self) -> None:
        self.changed.notify_all()
        for listener in self.listeners:
            listener()

    @locked
    def listen(self, listener: Callable[[], None]) -> None:
        """Call `listener` (under the lock, so it must not block) after every change: a transport wakes
        its streams with it."""
        self.listeners.append(listener)

    @changes
    def notify(self) -> None:
        """Wake every waiter and listener, though nothing here changed (a driver's own state did: it stops)."""

    # jobs

    @changes
    def add_job(self, spec: JobSpec, sites: list[Site], steps: int | None = None, data: dict | None = None,
                tenant: str = "default", init: dict[str, dict] | None = None) -> JobRecord:
        """Schedule a job over `sites` for `steps` steps (None: until cancelled), owned by `tenant`;
        `init` ({site: parameters}, e.g. an export's) is every site's version 0 instead of the seeded init."""
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} already exists")
        if not sites:
            raise ValueError(f"job {spec.job_id!r} has no sites")
        check_schedule(spec, steps)
        recs = {s.name: SiteRecord(s, param_shapes(spec.adapter, s)) for s in sites}
        try:  # what every worker will build: a spec none can build is refused now, not on each device
            recs[sites[0].name].skeleton = optimizer_skeleton(spec, sites[0])  # (check_update would build it)
        except Exception as e:
            raise ValueError(f"job {spec.job_id!r}: its optimizer cannot be built: {type(e).__name__}: {e}") from None
        if init is not None:
            check_init(recs, init)
        record = {"spec": spec.to_dict(), "sites": [s.to_dict() for s in sites], "steps": steps, "data": data,
                  "tenant": tenant}
        if init is not None:
            record["init"] = pack_params(init)
        self.store.save_job(spec.job_id, record)
        job = self.jobs[spec.job_id] = JobRecord(spec, steps, recs, data, tenant=tenant, init=init)
        self._max_update = None
        self._save_progress(job)
        self._assign()
        return job

    @locked
    def note(self, job_id: str, text: str) -> None:
        """Tell the job's owner something: the submit's answer, and an event in its next metrics row
        (`colaflow logs`, the page)."""
        job = self.job(job_id)
        job.notes.append(text)
        job.events.append(text)

    @locked
    def notes(self, job_id: str) -> list[str]:
        """The advice given on the job at submit (`note`)."""
        return list(self.job(job_id).notes)

    @locked
    def watch(self, job_id: str, watch: Watch | None) -> None:
        """Rank the job's eval steps by `watch` (and stop it early after its patience); None: no eval."""
        self.job(job_id).watch = watch

    @locked
    def job(self, job_id: str) -> JobRecord:
        """The job's record (read it under `lock` where other threads run)."""
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}")
        return self.jobs[job_id]

    @locked
    def weights(self, job_id: str, which: str = "last", tenant: str | None = None) -> JobWeights:
        """What an export of the job holds: its spec, sites and parameters — `last`, the newest version
        the server holds; `best`, those the best eval step used — and their versions."""
        job = self.find(job_id, tenant)
        if which not in ("last", "best"):
            raise ValueError(f"`which` must be last or best, got {which!r}")
        if which == "best" and job.best is None:
            raise ValueError(f"job {job_id!r} has no eval yet: `which='best'` needs the job to have been "
                             "submitted with `eval_data` or `eval_prompts` and to have run an eval")
        if which == "best":
            params, versions = job.best.params, dict(job.best.versions)
        else:
            params = {n: self._params(job, r, r.received) for n, r in job.sites.items()}
            versions = {n: r.received for n, r in job.sites.items()}
        return JobWeights(job.spec, {n: r.site for n, r in job.sites.items()}, params, versions)

    def _params(self, job: JobRecord, rec: SiteRecord, version: int) -> dict:
        """A version's parameters; version 0 is the job's `init` or the seeded initialisation, never stored."""
        if version == 0:
            if job.init is not None:
                return job.init[rec.site.name]
            return {n: p.detach() for n, p in build_adapter(job.spec.adapter, rec.site,
                                                            seed=site_seed(job.spec, rec.site)).named_parameters()}
        return rec.versions[version]


def check_schedule(spec: JobSpec, steps: int | None) -> None:
    """A job's schedule within what the server keeps for it: it keeps each step's packets until a learner
    state covers them (`fit_interval` x `state_every` steps), and each version a step within `staleness`
    may need. Checked before anything is sized or allocated for the job."""
    for name, value in (("fit_interval", spec.fit_interval), ("staleness", spec.staleness),
                        ("state_every", spec.state_every),
                        ("fit_interval x state_every", spec.fit_interval * spec.state_every)):
        if value > MAX_FIT_INTERVAL:
            raise ValueError(f"`{name}` {value} is over {MAX_FIT_INTERVAL}: the server would keep that many "
                             "steps of packets or versions")
    if steps is not None:
        check_steps(steps)
    if steps is not None and spec.fit_interval > steps:  # its adapters would never change, and the packets pile up
        raise ValueError(f"`fit_interval` {spec.fit_interval} is more than the job's {steps} steps: "
                         "its adapters would never be fitted")
