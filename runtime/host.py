"""The capture step: a frozen base model, the server's copy of every job's adapters, and the step.

One `step` runs forward with each row's job's adapters and a backward that computes no parameter
gradient at all, only g = dL/dh at every adapted site, and returns one packet per (job, site):

    host = Host(model)
    host.add_job(JobSpec("acme"))
    result = host.step(batch)          # batch: model inputs + labels + jobs (one job id per row)
    for p in result.packets: ...       # Packet(job, site, step, version, x, g) -> the owning worker
    host.apply(update)                 # at a step boundary: the version the scheduler chose

It lives in the library (not the service) because the in-process `Trainer` runs it too; the
server's coordinator runs the same object on its device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, LowRankAdapter, build_adapter, load_params
from .gl import Packet, Update, site_seed
from .job import JobSpec
from .loss import LossFn, causal_lm, per_job
from .merge import merged_weights
from .sites import Site, find_sites, site_module


@dataclass
class HostedJob:
    spec: JobSpec
    sites: dict[str, Site]
    adapters: dict[str, Adapter]  # the server's copies: parameters only, never a gradient
    versions: dict[str, int]
    merged: dict[str, tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@dataclass
class StepResult:
    step: int
    losses: dict[str, float]  # each job's mean loss over its own tokens
    packets: list[Packet]
    tokens: dict[str, int]


@dataclass
class _Ctx:
    """What the site hooks need during one forward; lives only inside `step` / `using`."""

    rows: dict[str, torch.Tensor | None]  # job -> row indices (None: the job has every row)
    row_job: torch.Tensor | None  # (B,) index into `order`, for mixed batches
    order: list[str]
    merged: set[str]  # sites whose weights already carry the single job's delta
    capture: bool
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> x
    detached: dict[tuple, torch.Tensor] = field(default_factory=dict)


class Host:
    """The server's side of ColA: frozen model + per-job adapter copies + the capture step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = causal_lm):
        self.model = model
        self.loss_fn = loss_fn
        for p in model.parameters():
            p.requires_grad_(False)
        self.jobs: dict[str, HostedJob] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._ctx: _Ctx | None = None
        self.steps = 0

    # jobs and updates

    def add_job(self, spec: JobSpec) -> list[Site]:
        """Host a job: resolve its sites, build its adapter copies, hook its sites."""
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} is already hosted")
        sites = find_sites(self.model, spec.target_modules)
        adapters = {}
        for s in sites:
            a = build_adapter(spec.adapter, s, seed=site_seed(spec, s)).to(self._device_of(s))
            adapters[s.name] = a.requires_grad_(False)
        self.jobs[spec.job_id] = HostedJob(spec, {s.name: s for s in sites}, adapters, {s.name: 0 for s in sites})
        for s in sites:
            if s.name not in self._hooks:
                mod = site_module(self.model, s)
                self._hooks[s.name] = mod.register_forward_hook(self._site_hook(s.name))
        return sites

    def limits(self) -> tuple[int | None, int | None]:
        """(vocabulary size, context length) of the model where it says, else None: what data must fit."""
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        try:
            vocab = self.model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):
            pass
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return vocab, context

    def remove_job(self, job_id: str) -> None:
        self.jobs.pop(job_id)
        live = {n for j in self.jobs.values() for n in j.sites}
        for name in [n for n in self._hooks if n not in live]:
            self._hooks.pop(name).remove()

    def apply(self, update: Update) -> None:
        """Use an update's parameters (and version) from the next forward; the scheduler picks which."""
        job = self._job(update.job)
        if update.site not in job.adapters:
            raise ValueError(f"job {update.job!r} has no site `{update.site}`")
        if update.version == job.versions[update.site]:
            return
        load_params(job.adapters[update.site], update.params)
        job.versions[update.site] = update.version
        job.merged.pop(update.site, None)

    def _job(self, job_id: str) -> HostedJob:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}; hosted: {sorted(self.jobs)}")
        return self.jobs[job_id]

    def _device_of(self, site: Site) -> torch.device:
        return next(site_module(self.model, site).parameters()).device

    # the step

    def step(self, batch: dict) -> StepResult:
        """Forward with adapters, backward for site gradients only; one packet per (job, site)."""
        jobs = list(batch["jobs"])
        inputs = {k: v for k, v in batch.items() if k not in ("jobs", "labels")}
        ctx = self._context(jobs, capture=True)
        self._ctx = ctx
        try:
            with torch.enable_grad():
                output = self._forward(inputs, ctx)
                row_sum, row_count = self.loss_fn(output, batch)
                del output  # the backward does not need the logits: keeping them costs a (B, T, V) tensor
                losses = per_job(row_sum, row_count, {j: torch.arange(len(jobs)) if r is None else r
                                                      for j, r in ctx.rows.items()})
                for job_id in ctx.rows:
                    missed = [n for n in self.jobs[job_id].sites if n not in ctx.outputs]
                    if missed:  # e.g. a tied embedding whose module is not the one the forward calls
                        raise RuntimeError(f"site `{missed[0]}` of job {job_id!r} was not called in the forward "
                                           f"({len(missed)} of its sites were not); pick modules the forward runs")
                names = list(ctx.outputs)
                grads = torch.autograd.grad(sum(losses.values()), [ctx.outputs[n] for n in names],
                                            allow_unused=True)
        finally:
            self._ctx = None
        g_of = {n: (g if g is not None else torch.zeros_like(ctx.outputs[n])) for n, g in zip(names, grads)}
        mask = batch.get("attention_mask")
        packets, tokens = [], {}
        for job_id, rows in ctx.rows.items():
            job = self.jobs[job_id]
            m = None if mask is None else (mask if rows is None else mask[rows])
            tokens[job_id] = int(m.sum()) if m is not None else len(jobs)
            by_input: dict[int, list[str]] = {}  # sites reading one input share its tensor on the wire
            for name in job.sites:
                by_input.setdefault(id(ctx.inputs[(job_id, name)]), []).append(name)
            for group in by_input.values():
                x = _rows(ctx.inputs[(job_id, group[0])], rows)
                gs = {n: _rows(g_of[n], rows) for n in group}
                for n, g in gs.items():
                    if not torch.isfinite(g).all():
                        raise FloatingPointError(f"site `{n}`: gradient of job {job_id!r} at step {self.steps} "
                                                 f"holds NaN or Inf (loss {float(losses[job_id].detach()):.4g})")
                keep = _live_tokens(x, list(gs.values()), [job.sites[n].kind for n in group])
                xs = _cut(x, keep)
                for n in group:
                    packets.append(Packet(job_id, n, self.steps, job.versions[n], xs, _cut(gs[n], keep)))
        result = StepResult(self.steps, {j: float(v.detach()) for j, v in losses.items()}, packets, tokens)
        self.steps += 1
        return result

    @contextlib.contextmanager
    def using(self, job_id: str):
        """Run the model as `job_id`'s adapted model (inference, e.g. `generate`)."""
        self._job(job_id)
        ctx = self._context([job_id], capture=False)
        ctx.merged = set()
        self._ctx = ctx
        try:
            yield self.model
        finally:
            self._ctx = None

    def _context(self, jobs: list[str], capture: bool) -> _Ctx:
        order = list(dict.fromkeys(jobs))
        for j in order:
            self._job(j)
        if len(order) == 1:
            job = self.jobs[order[0]]
            merged = {n for n, a in job.adapters.items() if job.spec.merge and self._mergeable(job, n)}
            return _Ctx({order[0]: None}, None, order, merged, capture)
        row_job = torch.tensor([order.index(j) for j in jobs])
        rows = {j: (row_job == i).nonzero().squeeze(1) for i, j in enumerate(order)}
        return _Ctx(rows, row_job, order, set(), capture)

    def _mergeable(self, job: HostedJob, name: str) -> bool:
        adapter, mod = job.adapters[name], site_module(self.model, name)
        if not adapter.spec.mergeable:
            return False
        return not (getattr(adapter, "bias", None) is not None and getattr(mod, "bias", None) is None)

    def _forward(self, inputs: dict, ctx: _Ctx):
        if not ctx.merged:
            return self.model(**inputs)
        job = self.jobs[ctx.order[0]]
        overrides = {}
        for name in ctx.merged:
            version, w, b = self._merged_weight(job, name)
            overrides[f"{name}.weight"] = w
            if b is not None:
                overrides[f"{name}.bias"] = b
        # W + dW is computed out of place: the base weights are never written, so never drift.
        # tie_weights=False: a merged embedding must not also change a tied lm_head.
        return torch.func.functional_call(self.model, overrides, (), inputs, tie_weights=False, strict=False)

    def _merged_weight(self, job: HostedJob, name: str):
        cached = job.merged.get(name)
        if cached is None or cached[0] != job.versions[name]:
            w = merged_weights(self.model, {name: job.adapters[name]})
            job.merged[name] = cached = (job.versions[name], w[f"{name}.weight"], w.get(f"{name}.bias"))
        return cached

    # the site hook: add each row's job's delta, keep x and the output whose gradient we want

    def _site_hook(self, name: str):
        def hook(module, args, output):
            ctx = self._ctx
            if ctx is None:
                return None
            jobs = [j for j in ctx.order if name in self.jobs[j].adapters]
            if not jobs:
                return None
            if name in ctx.outputs:
                raise RuntimeError(f"site `{name}` was called twice in one forward; colaflow adapts "
                                   "modules that run once per forward")
            x = args[0]
            if ctx.capture and not output.requires_grad:
                output = output.detach().requires_grad_(True)  # nothing below needs a gradient
            delta = self._delta(name, x, output, jobs, ctx)
            out = output if delta is None else output + delta
            if ctx.capture:
                ctx.outputs[name] = out
            return out
        return hook

    def _delta(self, name: str, x: torch.Tensor, output: torch.Tensor, jobs: list[str], ctx: _Ctx):
        if len(jobs) == 1 and ctx.rows[jobs[0]] is None:  # single-job batch
            job = self.jobs[jobs[0]]
            xj = self._adapter_input(job, name, x, ctx)
            return None if name in ctx.merged else job.adapters[name](xj)
        adapters = [self.jobs[j].adapters[name] for j in jobs]
        if len(jobs) == len(ctx.order) and _uniform_lowrank(adapters):
            for j in jobs:
                self._adapter_input(self.jobs[j], name, x, ctx)
            return _mixed_lowrank(x, adapters, ctx.row_job)
        delta = output.new_zeros(output.shape)
        for j in jobs:
            rows = ctx.rows[j]
            xj = self._adapter_input(self.jobs[j], name, x, ctx)
            delta = delta.index_put((rows,), self.jobs[j].adapters[name](xj[rows]))
        return delta

    def _adapter_input(self, job: HostedJob, name: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        """The input the adapter sees: x, or x after the adapter's dropout (the device fits that)."""
        p = job.adapters[name].spec.dropout
        if p > 0 and ctx.capture:
            x = F.dropout(x, p, training=True)
        if ctx.capture:  # one detached tensor per distinct input, so shared inputs stay shared;
            # keyed by memory, not id(): a freed input's id may be reused within the forward
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            ctx.inputs[(job.spec.job_id, name)] = ctx.detached.setdefault(key, x.detach())
        return x


def _uniform_lowrank(adapters: list[Adapter]) -> bool:
    first = adapters[0]
    return all(isinstance(a, LowRankAdapter) and a.site.kind in ("linear", "conv1d") and a.spec.dropout == 0
               and a.spec.r == first.spec.r and a.A.dtype == first.A.dtype for a in adapters)


def _mixed_lowrank(x: torch.Tensor, adapters: list[LowRankAdapter], row_job: torch.Tensor) -> torch.Tensor:
    """Every row through its own job's low-rank adapter in two batched matmuls."""
    B = x.shape[0]
    idx = row_job.to(x.device)
    A = torch.stack([a.A for a in adapters])[idx]  # (B, r, in)
    Bm = torch.stack([a.B for a in adapters])[idx]  # (B, out, r)
    scale = torch.tensor([a.scaling for a in adapters], dtype=x.dtype, device=x.device)[idx]  # (B,)
    h = torch.bmm(x.reshape(B, -1, x.shape[-1]), A.transpose(1, 2))  # (B, T, r)
    d = torch.bmm(h, Bm.transpose(1, 2)) * scale.view(B, 1, 1)  # (B, T, out)
    return d.reshape(*x.shape[:-1], d.shape[-1])


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A job's rows of a site tensor (all of them for a single-job batch)."""
    t = t.detach()
    return t if rows is None else t[rows]


def _live_tokens(x: torch.Tensor, gs: list[torch.Tensor], kinds: list[str]) -> torch.Tensor | None:
    """(B, T) mask of the tokens where any of the sites reading `x` has a nonzero gradient.

    Adapters act token by token, so a token whose g is zero adds exactly nothing to J^T g: it
    need not travel. This cuts padding (either side) and tokens no loss depends on, for every
    sequence of every architecture (encoder, decoder, cross-attention) without knowing which mask
    belongs to which sequence. None: not token-shaped (conv2d, per-row outputs); send everything.
    """
    if any(k not in ("linear", "conv1d", "embedding") for k in kinds):
        return None
    if any(g.dim() < 3 or tuple(g.shape[:2]) != tuple(x.shape[:2]) for g in gs):
        return None
    keep = gs[0].flatten(2).ne(0).any(-1)  # (B, T)
    for g in gs[1:]:
        keep |= g.flatten(2).ne(0).any(-1)
    return keep


def _cut(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(N, ...) rows of the kept tokens: a view when every token is kept, a copy otherwise."""
    if keep is None:
        return t
    return t.flatten(0, 1) if bool(keep.all()) else t[keep]
