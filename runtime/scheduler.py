"""The scheduler: the server's transport-free state machine. Plain objects, an injected clock.

It decides which job steps when, which adapter version each step uses, what goes to which worker,
and what is acknowledged. It never computes (the driver runs `Host.step`) and never does I/O
except through its `Store`. Drivers: `colaflow.Trainer` (in-process, synchronous delivery) and
the server's coordinator (a thread and a lock around it, gRPC pumps to the workers).

    s = Scheduler(store, reassign_after=30.0, clock=time.monotonic)
    s.add_job(spec, sites, steps)                  # sites from Host.add_job
    session = s.register("w1"); stream = s.connect("w1", session, Hello())
    for job in s.ready():
        plan = s.begin(job)                        # host.apply(u) for u in plan.apply; then the forward
        s.finish(plan, packets, loss, tokens)      # packets are kept until durable state covers them
    msg = s.next_message("w1", stream)             # Assign | Packets | Ack | Revoke, or None
    s.receive("w1", update)                        # Update | Refusal from the worker

Staleness is deterministic: step t uses exactly version need(t) = max(0, t - S) // I of every
site, never a newer one that happened to arrive early, so a run is a function of (spec, data,
seed). A worker's learner state (optimizer included) reaches the server every `state_every`
fits; the packets since are retained, so a site moves to another worker exactly.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Callable

from .adapters import Adapter, build_adapter, load_params
from .gl import LearnerState, Packet, Update, site_seed
from .job import JobSpec
from .protocol import Ack, Assign, Hello, Packets, Refusal, Revoke, SiteStart, ToServer, ToWorker
from .records import (LIVE, Best, JobRecord, SiteRecord, StepPlan, WorkerRecord, check_init, check_update,
                      optimizer_skeleton, out_of_bounds, param_shapes, restored_job)
from .sites import Site
from .errors import ResourceExhausted
from .store import Store

log = logging.getLogger("colaflow.scheduler")
MAX_FIT_INTERVAL = 256
FIT_TIMEOUT_S = 300.0  # at least: no honest device takes this long to fit one step's packets
MIN_SILENCE_S = 10.0  # a live worker beats every second; a busy machine may delay a few: never less than this


class Abandoned(Exception):
    """A step stopped half-way because its job stopped running (cancelled, failed, moved on)."""


class Scheduler:
    def __init__(self, store: Store | None = None, reassign_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, max_workers: int = 10_000):
        self.store = store if store is not None else Store()
        self.reassign_after, self.max_workers = reassign_after, max_workers
        self.fit_timeout = max(FIT_TIMEOUT_S, 10 * reassign_after)  # a connected worker's, per job (see _move_stalled)
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self._ended: list[str] = []
        self._max_update: int | None = None  # cached; recomputed when jobs come or go
        self.store_error = ""  # why the store last failed ("" when it works): no step runs meanwhile
        self._dirty: set[str] = set()  # jobs whose progress the store has not taken yet
        self.quarantined: dict[str, str] = {}  # worker id -> why it gets no work
        self._store_failures, self._store_retry_at = 0, 0.0
        self._restore()

    # jobs

    def add_job(self, spec: JobSpec, sites: list[Site], steps: int | None = None, data: dict | None = None,
                tenant: str = "default", init: dict[str, dict] | None = None) -> JobRecord:
        """Schedule a job over `sites` for `steps` steps (None: until cancelled), owned by `tenant`;
        `init` ({site: parameters}, e.g. an export's) is every site's version 0 instead of the seeded init."""
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} already exists")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"`steps` must be an int >= 1, got {steps!r}")
        if not sites:
            raise ValueError(f"job {spec.job_id!r} has no sites")
        if steps is not None and spec.fit_interval > steps:  # its adapters would never change, and the packets
            raise ValueError(f"`fit_interval` {spec.fit_interval} is more than the job's {steps} steps: "  # pile up
                             "its adapters would never be fitted")
        # the server keeps each step's packets until a learner state covers them (`fit_interval` x
        # `state_every` steps), and each version a step within `staleness` may need
        for name, value in (("fit_interval", spec.fit_interval), ("staleness", spec.staleness),
                            ("state_every", spec.state_every),
                            ("fit_interval x state_every", spec.fit_interval * spec.state_every)):
            if value > MAX_FIT_INTERVAL:
                raise ValueError(f"`{name}` {value} is over {MAX_FIT_INTERVAL}: the server would keep that many "
                                 "steps of packets or versions")
        recs = {s.name: SiteRecord(s, param_shapes(spec, s)) for s in sites}
        try:  # what every worker will build: a spec none can build is refused now, not on each device
            recs[sites[0].name].skeleton = optimizer_skeleton(spec, sites[0])  # (check_update would build it)
        except Exception as e:
            raise ValueError(f"job {spec.job_id!r}: its optimizer cannot be built: {type(e).__name__}: {e}") from None
        if init is not None:
            check_init(recs, init)
        record = {"spec": spec.to_dict(), "sites": [s.to_dict() for s in sites], "steps": steps, "data": data,
                  "tenant": tenant}
        if init is not None:
            from .export import pack_params

            record["init"] = pack_params(init)
        self.store.save_job(spec.job_id, record)
        job = self.jobs[spec.job_id] = JobRecord(spec, steps, recs, data, tenant=tenant, init=init)
        self._max_update = None
        self._save_progress(job)
        self._assign()
        return job

    def job(self, job_id: str) -> JobRecord:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}")
        return self.jobs[job_id]

    def cancel(self, job_id: str, reason: str = "cancelled") -> JobRecord:
        job = self.job(job_id)
        if job.state in LIVE:
            self._end(job, "cancelled", reason)
        return job

    def fail(self, job_id: str, reason: str) -> None:
        job = self.job(job_id)
        if job.state in LIVE:
            log.error("job %s failed: %s", job_id, reason)
            self._end(job, "failed", reason)

    def take_ended(self) -> list[str]:
        """Jobs that ended since the last call (the driver frees their host state)."""
        out, self._ended = self._ended, []
        return out

    def adapters(self, job_id: str, which: str = "last") -> dict[str, Adapter]:
        """The job's adapters, built fresh (for export): `last`, the newest version the server holds;
        `best`, those the best eval step used."""
        job = self.job(job_id)
        if which not in ("last", "best"):
            raise ValueError(f"`which` must be last or best, got {which!r}")
        if which == "best" and job.best is None:
            raise ValueError(f"job {job_id!r} has no eval yet: `which='best'` needs the job to have been "
                             "submitted with `eval_data` or `eval_prompts` and to have run an eval")
        out = {}
        for name, rec in job.sites.items():
            adapter = build_adapter(job.spec.adapter, rec.site, seed=site_seed(job.spec, rec.site))
            if which == "best":
                load_params(adapter, job.best.params[name])
            elif rec.received > 0 or job.init is not None:
                load_params(adapter, self._params(job, rec, rec.received))
            out[name] = adapter.requires_grad_(False)
        return out

    def versions(self, job_id: str, which: str = "last") -> dict[str, int]:
        """The version of every site that `adapters(job_id, which)` holds."""
        job = self.job(job_id)
        if which == "best" and job.best is not None:
            return dict(job.best.versions)
        return {n: r.received for n, r in job.sites.items()}

    def _params(self, job: JobRecord, rec: SiteRecord, version: int) -> dict:
        """A version's parameters; version 0 is the job's `init` or the seeded initialisation, never stored."""
        if version == 0:
            if job.init is not None:
                return job.init[rec.site.name]
            return {n: p.detach() for n, p in build_adapter(job.spec.adapter, rec.site,
                                                            seed=site_seed(job.spec, rec.site)).named_parameters()}
        return rec.versions[version]

    def latest(self, job_id: str) -> list[Update]:
        """The newest received update of every site, for the host to load now (the Trainer's `flush`)."""
        job, out = self.job(job_id), []
        for name, rec in job.sites.items():
            if rec.received > 0:
                out.append(Update(job_id, name, rec.received, rec.versions[rec.received], 0.0))
                rec.applied = rec.received  # the next `begin` puts the host back on need(t)
        return out

    # steps

    def ready(self, layered: bool = False) -> list[str]:
        """Jobs whose next step may run now; also moves lost workers' sites and finishes jobs.

        `layered`: also jobs whose step may start before every site's version is in (the forward
        waits at each site for its own; see `begin`), but not those that merge their weights.
        """
        self._reassign_lost()
        self._move_stalled()
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

    def begin(self, job_id: str, layered: bool = False) -> StepPlan:
        """The plan of a ready job's next step; raises if it is not ready. With `layered`, sites whose
        version is not in yet are `plan.waiting`: take each with `arrived` before the forward uses it."""
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
            elif rec.applied != need:
                apply.append(Update(job_id, name, need, self._params(job, rec, need), 0.0))
                rec.applied = need
        # what the step could have used at its start; a step run again (after a restart) does not count
        # the versions its own fits made the first time
        newest = min(max(r.received for r in job.sites.values()), job.t // job.spec.fit_interval)
        return StepPlan(job_id, job.t, need, apply, waiting, max(0, newest - need))

    def arrived(self, plan: StepPlan, site: str) -> Update | None:
        """A waiting site's update for `plan` once its version is in (None: not yet); raises
        `Abandoned` if the job stopped running meanwhile."""
        job = self.jobs.get(plan.job)
        if job is None or job.state != "running" or job.t != plan.step:
            raise Abandoned(f"job {plan.job!r} stopped while step {plan.step} waited for `{site}`")
        rec = job.sites[site]
        if rec.received < plan.need:
            return None
        rec.applied = plan.need
        return Update(plan.job, site, plan.need, self._params(job, rec, plan.need), 0.0)

    def publish(self, plan: StepPlan, packet: Packet) -> None:
        """One packet of a running step: its owner may have it now (a step streams its packets)."""
        job = self.jobs.get(plan.job)
        if job is None or job.state != "running" or job.t != plan.step:
            return  # cancelled or failed while the step ran
        if packet.site not in job.sites or packet.version != plan.need:
            raise RuntimeError(f"host packet for site `{packet.site}` used version {packet.version}; "
                               f"the scheduler planned {plan.need}")
        rec = job.sites[packet.site]
        if plan.step <= self._floor(job, rec):
            return  # durable state already folds this step in (its fit came back before the step ended)
        packet.step = plan.step
        rec.retained[plan.step] = packet

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
        job.losses.append(loss)
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
        self._save_progress(job)
        self._ended.append(job.job_id)

    # workers

    def register(self, worker_id: str, capabilities: dict | None = None, credential: str = "") -> str:
        """A worker announces itself; returns the session its connections must present.

        An id belongs to the first credential that registers it: another credential is refused, so
        a worker token cannot take over someone else's worker (and its adapters and packets).
        """
        w = self.workers.get(worker_id)
        if w is None:
            if len(self.workers) >= self.max_workers:
                raise ResourceExhausted(f"the server has {len(self.workers)} workers registered (its limit)")
            w = self.workers[worker_id] = WorkerRecord(worker_id, secrets.token_hex(8), credential=credential,
                                                       registered_at=self.clock())
        if not w.credential:
            w.credential = credential  # a restored owner: the first to come back with a credential binds it
        elif not secrets.compare_digest(w.credential, credential):
            raise PermissionError(f"worker id {worker_id!r} belongs to another credential")
        w.capabilities = dict(capabilities or {})
        w.quarantined = self.quarantined.get(worker_id, w.quarantined)
        return w.session

    def connect(self, worker_id: str, session: str, hello: Hello) -> int:
        """A connection opened: resume from the worker's progress; returns the connection's stream id."""
        w = self.workers.get(worker_id)
        if w is None or not secrets.compare_digest(w.session, session):
            raise PermissionError(f"worker {worker_id!r} must Register before Work (unknown session)")
        if w.connected:
            log.warning("worker %s connected again while its stream %d is live: the older stream closes "
                        "(two workers with one id?)", worker_id, w.stream)
        w.stream += 1
        w.connected, w.left_at, w.credits = True, None, 0
        w.control.clear()
        w.cursor.clear()
        holds = {(p.job, p.site): p.version for p in hello.progress}
        for p in hello.progress:
            job = self.jobs.get(p.job)
            rec = job.sites.get(p.site) if job is not None and job.state in LIVE else None
            if rec is not None and rec.owner is None and not w.quarantined:
                rec.owner = worker_id  # unowned (e.g. after a server restart): its holder takes it back
            if rec is not None and rec.owner == worker_id:
                w.cursor[(p.job, p.site)] = max(p.fitted_through, self._floor(job, rec))
            else:
                if job is not None:
                    job.former.add(worker_id)  # it held the site: its resent updates are expected, not hostile
                w.control.append(Revoke(p.job, [p.site], "no longer assigned to this worker"))
        for job in self.jobs.values():
            mine = [n for n, r in job.sites.items() if r.owner == worker_id] if job.state in LIVE else []
            if mine:
                self._send_assign(w, job, mine, holds)
        self._assign()
        log.info("worker %s connected (stream %d), owns %d sites", worker_id, w.stream, self._load(worker_id))
        return w.stream

    def disconnect(self, worker_id: str, stream: int, leaving: bool = False) -> None:
        """The worker's connection ended; `leaving`: for good (its sites move at the next `ready`)."""
        w = self.workers.get(worker_id)
        if w is not None and w.stream == stream and w.connected:
            w.connected = False
            w.left_at = self.clock() - (self.reassign_after if leaving else 0.0)
            if leaving:
                log.info("worker %s left for good; its sites move now", worker_id)
            else:
                log.info("worker %s disconnected; its sites wait %.0f s before they move", worker_id,
                         self.reassign_after)

    def current(self, worker_id: str, stream: int) -> bool:
        """True while `stream` is the worker's live connection."""
        w = self.workers.get(worker_id)
        return w is not None and w.connected and w.stream == stream

    def grant(self, worker_id: str, stream: int, n: int) -> None:
        """The worker may take `n` more packet frames."""
        if self.current(worker_id, stream):
            self.workers[worker_id].credits += max(0, int(n))

    def next_message(self, worker_id: str, stream: int) -> ToWorker | None:
        """The next message for the worker's live connection, or None (nothing now, or no credit)."""
        if not self.current(worker_id, stream):
            return None
        w = self.workers[worker_id]
        if w.control:
            return w.control.popleft()
        if w.credits <= 0:
            return None
        frame = self._next_frame(w)
        if frame is not None:
            w.credits -= 1
        return frame

    def max_update_bytes(self) -> int:
        """The largest update frame an honest worker can send now: per-connection memory stays bounded."""
        if self._max_update is None:
            biggest = max((4 * sum(math.prod(s) for s in r.shapes.values())  # fp32 params
                           for j in self.jobs.values() if j.state in LIVE for r in j.sites.values()), default=0)
            self._max_update = 4 * biggest + (1 << 20)  # params, two optimizer moments, and room to spare
        return self._max_update

    def count_bytes(self, job_id: str, sent: int = 0, received: int = 0) -> None:
        """Wire bytes of a job's packets and updates, as the transport counts them."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.bytes_sent += sent
            job.bytes_received += received

    def receive(self, worker_id: str, msg: ToServer) -> None:
        """Take an Update or Refusal from a worker. Raises PermissionError / ValueError on bad input."""
        if isinstance(msg, Refusal):
            job = self.jobs.get(msg.job)
            rec = job.sites.get(msg.site) if job is not None else None
            if rec is not None and rec.owner == worker_id and job.state in LIVE:
                self.fail(msg.job, f"worker {worker_id} refused step {msg.step} of site `{msg.site}`: {msg.reason}")
            elif job is None or worker_id not in job.former:  # as for updates: only its own sites' business
                raise PermissionError(f"worker {worker_id!r} is not assigned site `{msg.site}` of job {msg.job!r}")
            return
        if not isinstance(msg, Update):
            raise TypeError(f"a worker sends Update or Refusal, not {type(msg).__name__}")
        self._on_update(worker_id, msg)

    def _on_update(self, worker_id: str, u: Update) -> None:
        job = self.jobs.get(u.job)
        rec = job.sites.get(u.site) if job is not None else None
        w = self.workers.get(worker_id)
        if rec is None or rec.owner != worker_id or w is None:
            if job is not None and w is not None and worker_id in job.former:
                w.control.append(Revoke(u.job, [u.site], "no longer assigned to this worker"))
                return  # late, from a past owner: normal after a move or a cancel
            # unknown and foreign jobs read the same: a worker learns nothing of other tenants
            raise PermissionError(f"worker {worker_id!r} is not assigned site `{u.site}` of job {u.job!r}")
        if u.version <= rec.received:  # a replay: acknowledge again, change nothing
            w.control.append(Ack(u.job, u.site, rec.received))
            return
        if u.version != rec.received + 1:
            raise ValueError(f"update of `{u.site}` has version {u.version}; expected {rec.received + 1}")
        want = u.version * job.spec.fit_interval - 1
        if u.fitted_through != want:
            raise ValueError(f"update of `{u.site}` v{u.version} says it fitted through step "
                             f"{u.fitted_through}; expected {want}")
        try:
            check_update(job.spec, rec, u)
        except ValueError as e:  # the job's own update cannot be used: it fails, with why; the stream and
            # the worker's other jobs go on, and the Revoke stops the worker sending it again on reconnect
            self.fail(u.job, f"worker {worker_id} sent an update it cannot have fitted: {e}")
            return
        why = out_of_bounds(rec, u)
        if why:  # finite but absurd: refuse it, and give this worker no more work
            self._quarantine(worker_id, f"update v{u.version} of `{u.site}` of job {u.job} is out of bounds: {why}")
            return
        prev = rec.received, rec.state
        rec.versions[u.version] = u.params
        rec.received = u.version
        if u.optimizer is not None:
            rec.state = LearnerState(u.version, u.params, u.optimizer)
        try:
            self.store.save_site(u.job, u.site, rec)
        except BaseException as e:
            rec.versions.pop(u.version, None)
            rec.received, rec.state = prev
            if isinstance(e, OSError):
                self._store_failed(e)  # the worker resends it; health says why meanwhile
            raise
        self._prune(job)
        if u.lr > 0:  # the fit's metrics, for the map of the step that uses this version
            job.fit_stats.setdefault(u.version, {})[u.site] = (float(u.grad_norm), float(u.lr))
        job.fits += 1
        w.fits += 1
        w.fit_times.append(self.clock())
        w.control.append(Ack(u.job, u.site, u.version))

    def _prune(self, job: JobRecord) -> None:
        """Drop packets that durable state covers and versions no restart or step can need."""
        keep = job.need(job.restart_step())
        for rec in job.sites.values():
            first = self._floor(job, rec) + 1
            for step in list(rec.retained):
                if step >= first:
                    break
                del rec.retained[step]
            for v in [v for v in rec.versions if v < keep and v != rec.received]:
                del rec.versions[v]

    def _floor(self, job: JobRecord, rec: SiteRecord) -> int:
        """The last step that the site's durable state already folds in."""
        return job.durable(rec) * job.spec.fit_interval - 1

    def _start(self, job: JobRecord, rec: SiteRecord) -> LearnerState | None:
        """Where a new owner of the site starts: the durable learner state (None: fresh)."""
        initial = None if job.init is None else LearnerState(0, job.init[rec.site.name], None)
        if job.spec.state_every:
            return rec.state if rec.state is not None else initial
        if rec.received == 0:
            return initial
        log.warning("job %s site %s moves with parameters only (state_every=0): a fresh optimizer",
                    job.job_id, rec.site.name)
        return LearnerState(rec.received, rec.versions[rec.received], None)

    def _next_frame(self, w: WorkerRecord) -> Packets | None:
        """The oldest step any of the worker's sites still lacks on this connection, as one frame."""
        best: tuple[int, str] | None = None
        for job_id, job in self.jobs.items():
            if job.state not in LIVE:
                continue
            for name, rec in job.sites.items():
                if rec.owner != w.worker_id or not rec.retained:
                    continue
                first = next(iter(rec.retained))
                nxt = max(w.cursor.get((job_id, name), first - 1) + 1, first)
                if nxt < first + len(rec.retained) and (best is None or nxt < best[0]):
                    best = (nxt, job_id)
        if best is None:
            return None
        step, job_id = best
        packets = []
        for name, rec in self.jobs[job_id].sites.items():
            key = (job_id, name)
            if rec.owner == w.worker_id and step in rec.retained and w.cursor.get(key, -1) < step:
                packets.append(rec.retained[step])
                w.cursor[key] = step
        return Packets(job_id, step, packets)

    def _load(self, worker_id: str) -> int:
        return sum(r.owner == worker_id for j in self.jobs.values() for r in j.sites.values())

    def _assign(self) -> None:
        """Give every unowned site of a live job to the connected worker with the fewest sites; sites
        of one parent module (q_proj and v_proj of one attention) go together, since they usually
        read one input and a shared input travels once per worker."""
        live = sorted(w.worker_id for w in self.workers.values() if w.connected and not w.quarantined)
        if not live:
            return
        load = {wid: self._load(wid) for wid in live}
        for job in self.jobs.values():
            if job.state not in LIVE:
                continue
            new: dict[str, list[str]] = {}
            groups: dict[str, list[str]] = {}
            for name, rec in job.sites.items():
                if rec.owner is None:
                    groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
            pool = [k for k in live if k not in job.slow] or live  # one that held it up: last resort
            for names in groups.values():
                wid = min(pool, key=lambda k: (load[k], k))
                for name in names:
                    job.sites[name].owner = wid
                load[wid] += len(names)
                new.setdefault(wid, []).extend(names)
            for wid, names in new.items():
                self._send_assign(self.workers[wid], job, names)
                log.info("assigned job %s sites %d -> worker %s", job.job_id, len(names), wid)
            if new:
                self._save_progress(job)

    def _send_assign(self, w: WorkerRecord, job: JobRecord, names: list[str], holds: dict | None = None) -> None:
        starts = []
        for name in names:
            rec = job.sites[name]
            held = (holds or {}).get((job.job_id, name), -1)
            # a worker that holds this version or a newer one keeps its own: no need to resend the state
            start = None if held >= job.durable(rec) else self._start(job, rec)
            starts.append(SiteStart(rec.site, start))
            key = (job.job_id, name)
            w.cursor[key] = max(w.cursor.get(key, -1), self._floor(job, rec))
        w.control.append(Assign(job.job_id, job.spec, starts))

    def _quarantine(self, worker_id: str, reason: str) -> None:
        """Take every site from a worker that sent an absurd update; they continue elsewhere from the
        last durable learner state, so the jobs resume exactly where the last good version left them."""
        w = self.workers[worker_id]
        w.quarantined = reason
        if len(self.quarantined) < self.max_workers:
            self.quarantined[worker_id] = reason  # it stays quarantined if it registers again
        log.warning("worker %s quarantined: %s", worker_id, reason)
        for job in self.jobs.values():
            mine = [n for n, r in job.sites.items() if r.owner == worker_id]
            if not mine:
                continue
            for name in mine:
                job.sites[name].owner = None
            job.former.add(worker_id)
            job.events.append(f"worker {worker_id} quarantined ({reason}); its {len(mine)} sites move")
            w.control.append(Revoke(job.job_id, mine, f"quarantined: {reason}"))
        self._assign()

    def _reassign_lost(self) -> None:
        """Sites of a worker gone longer than `reassign_after` move to connected workers. A worker whose
        stream is open but silent that long (no frame, no heartbeat: stopped, hung, or cut off without
        a reset) counts as gone since it was last heard from; if it wakes, it reconnects as any other."""
        now = self.clock()
        silent_after = max(self.reassign_after, MIN_SILENCE_S)
        for w in self.workers.values():
            if w.connected and w.last_seen is not None and now - w.last_seen >= silent_after:
                log.warning("worker %s silent for %.0f s (no frame or heartbeat): it counts as gone", w.worker_id,
                            now - w.last_seen)
                w.connected, w.left_at = False, w.last_seen
        for w in [w for w in self.workers.values() if not w.connected and w.left_at is None
                  and now - w.registered_at > max(60.0, self.reassign_after) and not self._load(w.worker_id)]:
            del self.workers[w.worker_id]  # registered, never connected: forgotten (its id is free again)
        gone = [w for w in self.workers.values()
                if not w.connected and w.left_at is not None and now - w.left_at >= self.reassign_after]
        if not gone or not any(w.connected for w in self.workers.values()):
            return  # nobody to move them to: they wait (and their worker may come back)
        for w in gone:
            moved = 0
            for job in self.jobs.values():
                for rec in job.sites.values():
                    if rec.owner == w.worker_id:
                        rec.owner = None
                        job.former.add(w.worker_id)
                        moved += 1
            del self.workers[w.worker_id]  # forgotten: if it returns, it registers anew
            log.warning("worker %s gone for %.0f s: moving its %d sites", w.worker_id, now - w.left_at, moved)
        self._assign()

    def _move_stalled(self) -> None:
        """Sites whose worker is connected (it beats) but has sent no version the job waits for in
        `fit_timeout` seconds (a hung fit, a worker that takes packets and never fits or never grants
        credit) move to another worker, from the last durable state: exact, only time is lost."""
        now, moved = self.clock(), False
        for job in self.jobs.values():
            if job.state != "running":
                job.stall = None
                continue
            target = job.need(job.t) if job.steps is None or job.t < job.steps else job.final_version()
            lagging = [n for n, r in job.sites.items() if r.received < target and r.owner in self.workers
                       and self.workers[r.owner].connected]  # a disconnected owner is `_reassign_lost`'s
            mark = (job.t, sum(r.received for r in job.sites.values()))
            if not lagging or job.stall is None or job.stall[0] != mark:
                job.stall = (mark, now)  # moving: the clock starts again
                continue
            if now - job.stall[1] < self.fit_timeout:
                continue
            by_owner: dict[str, list[str]] = {}
            for name in lagging:
                by_owner.setdefault(job.sites[name].owner, []).append(name)
            for wid, names in by_owner.items():
                why = f"worker {wid} sent no fit of {len(names)} sites in {now - job.stall[1]:.0f} s"
                log.warning("job %s: %s; they move", job.job_id, why)
                job.events.append(f"{why}; they move")
                for name in names:
                    job.sites[name].owner = None
                job.former.add(wid)
                job.slow.add(wid)
                self.workers[wid].control.append(Revoke(job.job_id, names, why))
            job.stall, moved = (mark, now), True
        if moved:
            self._assign()

    def _revoke(self, job: JobRecord, reason: str) -> None:
        by_owner: dict[str, list[str]] = {}
        for name, rec in job.sites.items():
            if rec.owner is not None:
                by_owner.setdefault(rec.owner, []).append(name)
                job.former.add(rec.owner)
                rec.owner = None
        for wid, names in by_owner.items():
            if wid in self.workers:
                self.workers[wid].control.append(Revoke(job.job_id, names, reason))

    # durability

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
                if len(job.metrics) > job.metrics_saved:  # first: progress never gets ahead of the history
                    self.store.save_metrics(job_id, job.metrics[job.metrics_saved:])
                    job.metrics_saved = len(job.metrics)
                self.store.save_progress(job_id, {
                    "t": job.t, "state": job.state, "error": job.error, "owners": owners,
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
        delay = min(30.0, 0.5 * 2 ** min(self._store_failures, 6))
        self._store_retry_at = self.clock() + delay
        if not self.store_error:
            log.error("the state dir refuses writes (%s): steps pause, retrying with back-off", e)
        self.store_error = f"{type(e).__name__}: {e}"

    def _restore(self) -> None:
        """Bring back every stored job (a restarted server): it resumes at its restart step."""
        for stored in self.store.load():
            job = restored_job(stored)
            if len(stored.get("metrics", [])) != len(job.metrics):  # drop the rows of steps that run again
                self.store.save_metrics(job.job_id, job.metrics, replace=True)
            job.metrics_saved = len(job.metrics)
            credentials = (stored.get("progress") or {}).get("credentials", {})
            for wid in {r.owner for r in job.sites.values() if r.owner is not None} - set(self.workers):
                # it holds the newest state: it has `reassign_after` seconds to come back for its sites
                self.workers[wid] = WorkerRecord(wid, secrets.token_hex(8), credential=credentials.get(wid, ""),
                                                 registered_at=self.clock(), left_at=self.clock())
            self.jobs[job.job_id] = job
            log.info("job %s restored at step %d (%s)", job.job_id, job.t, job.state)
