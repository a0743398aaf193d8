"""The one way a job comes in, for the in-process Trainer, `Session` and the server alike.

    a = prepare(host, spec, data, init=blob)      # checks and resolution: no state taken, no lock needed
    record = admit(host, scheduler, a, steps)     # hosted and scheduled, all or nothing

`prepare` refuses bad data (a data map's rows against the model's vocabulary and context, its eval
set, an `init` export against the job's sites and shapes) before anything is allocated, turns a
plain spec into what a classifier runs (its head trains too), and resolves the job's sites (a target
regex is matched against every module name: a server does this outside its lock). `admit` builds
the host's copies and schedules the job; if the scheduler refuses it, the host lets it go again.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from ..data.batches import batch_shape, check_limits, from_map
from ..engine.classify import classification_spec
from ..engine.evaluate import EvalSet, Metric, parse
from ..engine.loss import causal_lm
from ..engine.memory import packet_bytes
from ..export import init_params
from ..job import JobSpec
from ..sites import Site
from .records import JobRecord
from .scheduler import Scheduler, check_schedule

log = logging.getLogger("colaflow.server")


@dataclass
class Admission:
    """A job checked and resolved, that holds nothing yet."""

    spec: JobSpec  # as the host runs it (on a classifier: with its head)
    sites: list[Site] | None  # resolved (None: a black-box job's one site is the host's to make)
    batches: Iterator[dict] | None  # the data map's batches (None: the driver brings each step's batch)
    evals: EvalSet | None
    init: dict[str, dict] | None = None  # {site: params} the adapters start from (checked against `sites`)
    shape: tuple[int, int] | None = None  # (rows, tokens) of its largest batch: what its step's memory is sized by


def prepare(host, spec: JobSpec, data: dict | None = None, evals: EvalSet | None = None,
            metric: Metric | None = None, init: bytes | dict | None = None) -> Admission:
    """Check `spec` and its data map (if given; its `eval` entry is the eval set) against `host`; `init`:
    a packed native export (`colaflow.export.init_blob`), checked against the resolved sites before any
    tensor is made, or {site: params} (the scheduler checks those)."""
    batches = None
    if data is not None:
        batches = from_map(data)  # refuse bad data before anything is allocated
        vocab, context = host.limits()
        check_limits(data, vocab, context)
        evals = parse(data.get("eval"), vocab, context, causal=getattr(host, "loss_fn", None) is causal_lm)
    if evals is not None and metric is not None:
        evals.metric = metric
    spec = classification_spec(spec, getattr(host, "model", None))  # a classifier's head trains too
    sites = host.resolve(spec)
    if isinstance(init, (bytes, bytearray)):
        init = init_params(spec, bytes(init), sites)
    return Admission(spec, sites, batches, evals, init, batch_shape(data) if data is not None else None)


def admit(host, scheduler: Scheduler, a: Admission, steps: int | None, tenant: str = "default",
          init: dict[str, dict] | None = None, data: dict | None = None) -> JobRecord:
    """Host and schedule a prepared job (under the scheduler's lock where other threads share the
    host); `init` {site: params}: its adapters' version 0 (default: `a.init`); `data`: the map the store
    keeps with it."""
    init = a.init if init is None else init
    check_schedule(a.spec, steps)  # before the host sizes its memory by it
    sites = host.add_job(a.spec, init, a.sites, a.shape)  # (refused here if its step cannot fit the memory)
    try:
        record = scheduler.add_job(a.spec, sites, steps, data, tenant, init)
    except BaseException:
        host.remove_job(a.spec.job_id)  # nothing half-made stays behind
        raise
    scheduler.watch(a.spec.job_id, None if a.evals is None else a.evals.watch)
    hint = projected_hint(a.spec, sites, a.shape)
    if hint:
        log.info("job %s: %s", a.spec.job_id, hint)
        scheduler.note(a.spec.job_id, hint)
    return record


HINT_BYTES = 64 * 2**20  # full packets a step past which projected ones are worth a word


def projected_hint(spec: JobSpec, sites: list[Site], shape: tuple[int, int] | None) -> str:
    """A word for a job whose full packets are large and could be projected (exact, far smaller), or ""."""
    if spec.packets != "full" or spec.staleness or not spec.adapter.projectable or shape is None:
        return ""
    if any(s.kind not in ("linear", "conv1d") for s in sites):
        return ""
    full, projected = packet_bytes(sites, shape[0] * shape[1], spec.adapter)
    if full < HINT_BYTES:
        return ""
    return (f"its full packets are about {full / 2**20:,.0f} MiB a step; packets='projected' would send about "
            f"{projected / 2**20:,.1f} MiB, exactly the same fit for its {spec.adapter.kind} adapter "
            "(docs/transport.md)")
