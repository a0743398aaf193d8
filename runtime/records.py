"""The scheduler's records: what the server knows of each job, site and worker, as plain dataclasses.

Kept apart from `scheduler.py` so the rules there read on one screen; `Store` implementations
(`colaflow.store`, the server's state dir) persist these records.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from .adapters import build_adapter
from .gl import LearnerState, Packet, Update, update_fault
from .job import JobSpec
from .sites import Site

LIVE = ("waiting", "running")
ENDED = ("done", "cancelled", "failed")


@dataclass
class SiteRecord:
    """The server's view of one (job, site)."""

    site: Site
    shapes: dict[str, tuple[int, ...]]  # the adapter's parameter shapes: every update is checked against them
    received: int = 0  # newest version received (and stored)
    versions: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # params by version, pruned
    state: LearnerState | None = None  # newest learner state with optimizer the server holds
    retained: dict[int, Packet] = field(default_factory=dict)  # step -> packet, contiguous steps
    owner: str | None = None
    applied: int = 0  # the version the host's copy holds
    skeleton: dict | None = None  # the form of a fresh learner's optimizer state (updates are checked against it)


@dataclass
class JobRecord:
    spec: JobSpec
    steps: int | None  # None: open-ended (the in-process Trainer)
    sites: dict[str, SiteRecord]
    data: dict | None = None  # the driver's data map, stored with the job; opaque here
    t: int = 0  # the next step to run
    state: str = "waiting"  # waiting, running, done, cancelled, failed
    error: str = ""
    losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # one row per step, from step 0 (kept by the store too)
    metrics_saved: int = 0  # rows the store has
    max_staleness: int = 0
    tenant: str = "default"  # who owns the job: only its tenant (and admin) sees it
    events: list[str] = field(default_factory=list)  # what happened to it since its last step (in the metrics)
    fits: int = 0  # updates accepted (one per site per fit)
    bytes_sent: int = 0  # packet bytes on the wire to workers (0 in process)
    bytes_received: int = 0  # update bytes on the wire from workers
    former: set[str] = field(default_factory=set)  # past owners: their late updates get a Revoke, not an error
    init: dict[str, dict[str, torch.Tensor]] | None = None  # version 0 of every site (None: the kind's seeded init)
    watch: "Watch | None" = None  # the eval metric that picks the best step and stops early (None: no eval)
    best: "Best | None" = None  # the adapters of the best eval so far (in memory: a restart tracks afresh)
    stale_evals: int = 0  # evals since the best one
    fit_stats: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # version -> site -> (grad norm, lr)
    stall: "tuple[tuple[int, int], float] | None" = None  # ((step, versions received), since when) while it waits
    slow: set[str] = field(default_factory=set)  # workers that held it up past the fit timeout: others first

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    def need(self, t: int) -> int:
        """The adapter version every site has in step t: exactly this one, no newer."""
        return max(0, t - self.spec.staleness) // self.spec.fit_interval

    def final_version(self) -> int | None:
        return None if self.steps is None else self.steps // self.spec.fit_interval

    def durable(self, rec: SiteRecord) -> int:
        """The version a new owner can continue this site from, exactly if `state_every` > 0."""
        if self.spec.state_every == 0:
            return rec.received
        return rec.state.version if rec.state is not None else 0

    def restart_step(self) -> int:
        """The first step whose packets are not covered by durable state (a restart recomputes from it)."""
        return min([self.t] + [self.durable(r) * self.spec.fit_interval for r in self.sites.values()])


@dataclass(frozen=True)
class Watch:
    """Which eval key ranks the steps (`higher`: larger is better) and after how many evals without
    improvement the job stops (`patience`; None: never early)."""

    key: str
    higher: bool
    patience: int | None = None

    def better(self, score: float, best: float) -> bool:
        return score > best if self.higher else score < best


@dataclass
class Best:
    """The best eval step so far and the adapter parameters that step used (version need(step))."""

    step: int
    score: float
    versions: dict[str, int]
    params: dict[str, dict[str, torch.Tensor]]


@dataclass
class WorkerRecord:
    worker_id: str
    session: str
    capabilities: dict = field(default_factory=dict)
    status: str = ""  # the worker's own word on its health ("" = healthy)
    credential: str = ""  # the credential this id is bound to (the first that registered it)
    registered_at: float = 0.0
    quarantined: str = ""  # why this worker gets no more sites (an update far out of bounds)
    connected: bool = False
    stream: int = 0  # +1 per connection: a stale connection can neither send nor take messages
    credits: int = 0
    left_at: float | None = None
    control: deque = field(default_factory=deque)  # Assign, Ack, Revoke: sent before any packets
    last_seen: float | None = None  # clock time of its last frame or heartbeat (None: not since this start)
    fits: int = 0  # updates accepted from it
    fit_times: deque = field(default_factory=lambda: deque(maxlen=4096))  # clock times of recent fits (its rate)
    bytes_in: int = 0  # wire bytes of its updates
    bytes_out: int = 0  # wire bytes of the packets sent to it
    cursor: dict[tuple[str, str], int] = field(default_factory=dict)  # last step sent (or fitted) per site


@dataclass
class StepPlan:
    """One job's next step: load `apply` into the host's copies, then run the forward."""

    job: str
    step: int
    need: int  # the version of every site in this step
    apply: list[Update]
    waiting: list[str] = field(default_factory=list)  # sites whose version is not in yet (layered start)
    staleness: int = 0  # the newest version in at the step's start, less the one it uses


def restored_job(stored: dict) -> JobRecord:
    """A job record from its stored form (`Store.load`): live jobs wait again, at their restart step."""
    meta, progress = stored["job"], stored.get("progress") or {}
    spec = JobSpec.from_dict(meta["spec"])
    sites = [Site.from_dict(s) for s in meta["sites"]]
    job = JobRecord(spec, meta["steps"], {s.name: SiteRecord(s, param_shapes(spec, s)) for s in sites}, meta.get("data"),
                    tenant=meta.get("tenant", "default"))
    if meta.get("init"):
        from .export import unpack_params

        job.init = unpack_params(meta["init"])
    for name, s in stored.get("sites", {}).items():
        rec = job.sites[name]
        rec.received, rec.versions, rec.state = s["received"], dict(s["versions"]), s["state"]
    job.state, job.error, job.t = progress.get("state", "waiting"), progress.get("error", ""), progress.get("t", 0)
    if job.state in LIVE:
        job.state = "waiting"
        job.t = job.restart_step()  # recompute from there: same data, same versions, same packets
        for name, wid in progress.get("owners", {}).items():
            job.sites[name].owner = wid
    for row in stored.get("metrics", []):  # the history up to the restart step; later steps are run again
        if row["step"] == len(job.metrics) < job.t:
            job.metrics.append(row)
    job.losses = [row["loss"] for row in job.metrics]
    job.max_staleness = max((row.get("staleness", 0) for row in job.metrics), default=0)
    return job


def param_shapes(spec: JobSpec, site: Site) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `spec`'s adapter at `site`, built on the meta device (no memory)."""
    with torch.device("meta"):
        adapter = build_adapter(spec.adapter, site)
    return {n: tuple(p.shape) for n, p in adapter.named_parameters()}


def check_init(recs: dict[str, SiteRecord], init: dict) -> None:
    """Raise unless `init` has exactly the job's sites, each with its adapter's parameter names and shapes."""
    if not isinstance(init, dict) or set(init) != set(recs):
        have = set(init) if isinstance(init, dict) else set()
        raise ValueError(f"`init`: the export's sites do not match the job's: missing {sorted(set(recs) - have)}, "
                         f"extra {sorted(have - set(recs))} (same model and `targets` as the exported job?)")
    for name, rec in recs.items():
        params = init[name]
        if set(params) != set(rec.shapes):
            raise ValueError(f"`init` site `{name}`: parameters {sorted(params)}, the adapter has {sorted(rec.shapes)}")
        for p, v in params.items():
            if tuple(v.shape) != tuple(rec.shapes[p]):
                raise ValueError(f"`init` site `{name}`: parameter `{p}` has shape {tuple(v.shape)}, the adapter "
                                 f"expects {tuple(rec.shapes[p])}")
            if not v.is_floating_point() or not torch.isfinite(v).all():
                raise ValueError(f"`init` site `{name}`: parameter `{p}` holds non-finite values")


def check_update(spec: JobSpec, rec: SiteRecord, u: Update) -> None:
    """Refuse an update whose parameters or optimizer state do not fit the site's adapter."""
    site = rec.site.name
    if set(u.params) != set(rec.shapes):
        raise ValueError(f"site `{site}`: adapter parameters {sorted(u.params)} do not match the "
                         f"{spec.adapter.kind} adapter's {sorted(rec.shapes)}")
    for name, value in u.params.items():
        if tuple(value.shape) != rec.shapes[name]:
            raise ValueError(f"site `{site}`: parameter `{name}` has shape {tuple(value.shape)}, "
                             f"the adapter expects {rec.shapes[name]}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"site `{site}`: parameter `{name}` holds non-finite values")
    for name in ("grad_norm", "lr"):  # metrics only, but a metric the operator reads must be a number
        value = getattr(u, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"update of `{site}` v{u.version}: `{name}` must be a finite number >= 0, got {value!r}")
    every = spec.state_every
    if every and u.version % every == 0 and u.optimizer is None:
        raise ValueError(f"update of `{site}` v{u.version} lacks the learner state "
                         f"(`state_every` is {every})")
    if u.optimizer is None:
        return
    for key, value in u.optimizer.tensors.items():
        name, _, _ = key.rpartition("/")
        if name not in rec.shapes or (tuple(value.shape) != rec.shapes[name] and value.numel() > 1):
            raise ValueError(f"site `{site}`: optimizer tensor `{key}` of shape {tuple(value.shape)} "
                             "matches no adapter parameter")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"site `{site}`: optimizer tensor `{key}` holds non-finite values")
    meta = u.optimizer.meta
    if not (isinstance(meta, dict) and set(meta) == {"groups", "values", "schedule"}):
        raise ValueError(f"site `{site}`: optimizer state needs exactly `groups`, `values` and `schedule`")
    # another worker will load this state: it must have the very form a fresh learner's has
    if rec.skeleton is None:
        rec.skeleton = optimizer_skeleton(spec, rec.site)
    _same_form(meta["groups"], rec.skeleton["groups"], f"site `{site}`: optimizer `groups`")
    _same_form(meta["schedule"], rec.skeleton["schedule"], f"site `{site}`: optimizer `schedule`")
    for key, value in meta["values"].items():
        if key.rpartition("/")[0] not in rec.shapes or not (value is None or isinstance(value, (bool, int, float))):
            raise ValueError(f"site `{site}`: optimizer value `{key}` = {value!r} is not a per-parameter scalar")


def out_of_bounds(rec: SiteRecord, u: Update) -> str:
    """Why an update is too far from the last version to be a fit (finite is not enough), or ""."""
    return update_fault(u.params, rec.versions.get(rec.received))


def optimizer_skeleton(spec: JobSpec, site: Site) -> dict:
    """The form of a fresh learner's optimizer and schedule state (built on the meta device)."""
    with torch.device("meta"):
        adapter = build_adapter(spec.adapter, site)
        optimizer, schedule = spec.optimizer.build(adapter.parameters())
    return {"groups": optimizer.state_dict()["param_groups"], "schedule": schedule.state_dict()}


def _same_form(got, want, where: str) -> None:
    """Raise unless `got` has `want`'s structure and kinds of values (the values may differ)."""
    if isinstance(want, bool):
        ok = isinstance(got, bool)
    elif isinstance(want, (int, float)):
        ok = isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got)
    elif want is None or isinstance(want, str):
        ok = got == want if want is None else isinstance(got, str)
    elif isinstance(want, (list, tuple)):
        ok = isinstance(got, (list, tuple)) and len(got) == len(want)
        if ok and where.endswith("`params`"):
            ok = list(got) == list(want)
        for i, (g, w) in enumerate(zip(got, want) if ok else ()):
            _same_form(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        ok = isinstance(got, dict) and set(got) == set(want)
        for k in sorted(want) if ok else ():
            _same_form(got[k], want[k], f"{where} `{k}`")
    else:
        ok = False
    if not ok:
        raise ValueError(f"{where} is {got!r}; a fresh learner has {want!r}")
