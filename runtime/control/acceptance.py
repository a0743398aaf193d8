"""What an update (or a job's `init`) must be before the scheduler takes it.

Every update is checked against the site's adapter (names, shapes, finite values), its metrics
must be numbers, and its optimizer state must have the very form a fresh learner's has (another
worker will load it); a finite update far from the last version is out of bounds (its sender is
quarantined). The rules live here so the scheduler's read as one sentence each.
"""
from __future__ import annotations

import math

import torch

from ..adapters.base import build_adapter
from ..job import JobSpec
from ..learn.fit import update_fault
from ..learn.messages import Update
from ..sites import Site
from .records import SiteRecord


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
