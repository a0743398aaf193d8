"""The scheduler's records: what the server knows of each job, site and worker, as plain dataclasses.

Only the scheduler writes them (its modules: planning, placement, delivery, progress); `Store`
implementations (`colaflow.control.store`, the server's state dir) persist them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..adapters.base import param_shapes
from ..job import JobSpec
from ..learn.messages import LearnerState, Packet
from ..sites import Site
from .status import ENDED, LIVE
from .store import unpack_params

__all__ = ["ENDED", "LIVE", "Best", "JobRecord", "JobWeights", "Load", "SiteRecord", "StepPlan", "Watch",
           "WorkerRecord",
           "restored_job"]


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
    metrics: list[dict] = field(default_factory=list)  # one row per step, from step 0 (kept by the store too)
    metrics_saved: int = 0  # rows the store has
    max_staleness: int = 0
    tenant: str = "default"  # who owns the job: only its tenant (and admin) sees it
    events: list[str] = field(default_factory=list)  # what happened to it since its last step (in the metrics)
    notes: list[str] = field(default_factory=list)  # advice given at submit (SubmitJobResponse.notes)
    fits: int = 0  # updates accepted (one per site per fit)
    bytes_sent: int = 0  # packet bytes on the wire to workers (0 in process)
    bytes_received: int = 0  # update bytes on the wire from workers
    former: set[str] = field(default_factory=set)  # past owners: their late updates get a Revoke, not an error
    init: dict[str, dict[str, torch.Tensor]] | None = None  # version 0 of every site (None: the kind's seeded init)
    watch: Watch | None = None  # the eval metric that picks the best step and stops early (None: no eval)
    best: Best | None = None  # the adapters of the best eval so far (in memory: a restart tracks afresh)
    stale_evals: int = 0  # evals since the best one
    # version -> site -> (grad norm, lr)
    fit_stats: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    stall: tuple[tuple[int, int], float] | None = None  # ((step, versions received), since when) while it waits
    slow: set[str] = field(default_factory=set)  # workers that held it up past the fit timeout: others first
    rebalanced_at: float | None = None  # clock time its sites last moved for balance (placement.py bounds how often)
    ended_at: float | None = None  # wall-clock time it ended (retention counts from it)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def losses(self) -> list[float]:
        """Each step's loss (its metrics row's): the loss history is kept once."""
        return [m["loss"] for m in self.metrics]

    @property
    def last_loss(self) -> float:
        return self.metrics[-1]["loss"] if self.metrics else 0.0

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
    connected_at: float = 0.0  # clock time its current connection opened
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
    lost_at: float | None = None  # clock time its sites moved because it was gone (None: not lost)
    left: bool = False  # it said goodbye for good (a lost worker that left, not one that failed)


@dataclass
class JobWeights:
    """A job's adapters as data (what an export writes): spec, sites, {site: parameters}, versions."""

    spec: JobSpec
    sites: dict[str, Site]
    params: dict[str, dict[str, torch.Tensor]]
    versions: dict[str, int]


@dataclass
class Load:
    """Put version `version` of a site's adapter into the host's copy (a step needs exactly it)."""

    job: str
    site: str
    version: int
    params: dict[str, torch.Tensor]


@dataclass
class StepPlan:
    """One job's next step: load `apply` into the host's copies, then run the forward."""

    job: str
    step: int
    need: int  # the version of every site in this step
    apply: list[Load]
    waiting: list[str] = field(default_factory=list)  # sites whose version is not in yet (layered start)
    staleness: int = 0  # the newest version in at the step's start, less the one it uses


def restored_job(stored: dict) -> JobRecord:
    """A job record from its stored form (`Store.load`): live jobs wait again, at their restart step."""
    meta, progress = stored["job"], stored.get("progress") or {}
    spec = JobSpec.from_dict(meta["spec"])
    sites = [Site.from_dict(s) for s in meta["sites"]]
    job = JobRecord(spec, meta["steps"], {s.name: SiteRecord(s, param_shapes(spec.adapter, s)) for s in sites},
                    meta.get("data"),
                    tenant=meta.get("tenant", "default"))
    if meta.get("init"):
        job.init = unpack_params(meta["init"])
    for name, s in stored.get("sites", {}).items():
        rec = job.sites[name]
        rec.received, rec.versions, rec.state = s["received"], dict(s["versions"]), s["state"]
    job.state, job.error, job.t = progress.get("state", "waiting"), progress.get("error", ""), progress.get("t", 0)
    job.ended_at = progress.get("ended_at")
    if job.state in LIVE:
        job.state = "waiting"
        job.t = job.restart_step()  # recompute from there: same data, same versions, same packets
        for name, wid in progress.get("owners", {}).items():
            job.sites[name].owner = wid
    for row in stored.get("metrics", []):  # the history up to the restart step; later steps are run again
        if row["step"] == len(job.metrics) < job.t:
            job.metrics.append(row)
    job.max_staleness = max((row.get("staleness", 0) for row in job.metrics), default=0)
    if job.state not in LIVE and job.ended_at is None:  # stored before jobs kept their end time
        job.ended_at = job.metrics[-1].get("time") if job.metrics else None
    return job
