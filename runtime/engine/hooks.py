"""The site hook: at each adapted module, add each row's job's delta and keep what its packet needs.

For a single-job batch the adapter runs on the whole input (or not at all: a merged weight already
carries it). A mixed batch runs each run of one job's rows through that job's adapter (LoRA adapters
of one shape stacked into two batched matmuls), and zeros for rows whose job does not adapt the site.
The hook keeps x — after the adapter's dropout, if any, since the worker fits the function the
forward used — and puts a gradient hook on the output, so g leaves the backward as soon as it exists.
Inputs shared by several sites (`q_proj`, `v_proj` read one tensor) are kept once.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..adapters.base import Adapter
from .hosted import HostedJob, StepContext
from .layout import RowLayout
from .mixed import stackable, stacked_delta


class SiteHooks:
    """The forward hooks of `Host` (a mixin): they read the step's context, `self._ctx`."""

    jobs: dict[str, HostedJob]
    layout: RowLayout
    _ctx: StepContext | None

    def _site_hook(self, name: str):
        def hook(module, args, output):
            ctx = self._ctx
            if ctx is None:
                return None
            jobs = [j for j in ctx.order if name in self.jobs[j].adapters]
            if not jobs:
                return None
            if ctx.recomputing:  # a checkpointed block again, in the backward: the same graph, and x kept now
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                delta = self._delta(name, args[0], output, jobs, ctx)
                return output if delta is None else (output + delta).to(output.dtype)
            if ctx.capture and name in ctx.shapes:
                raise RuntimeError(f"site `{name}` was called twice in one forward; colaflow adapts "
                                   "modules that run once per forward")
            x = args[0]
            if ctx.gate is not None:
                ctx.gate(name)
            if ctx.capture and not output.requires_grad:
                output = output.detach().requires_grad_(True)  # nothing below needs a gradient
                ctx.captured.leaves.append(output)
            delta = self._delta(name, x, output, jobs, ctx)
            # fp32 adapters on a bf16 model: the sum in fp32, then the model's dtype (as PEFT's LoRA layer)
            out = output if delta is None else (output + delta).to(output.dtype)
            ctx.shapes[name] = (out.shape, out.dtype, out.device)
            if ctx.capture:  # g leaves the backward here, not at its end
                out.register_hook(lambda g: ctx.stream.grad(name, g))
            return out
        return hook

    def _delta(self, name: str, x: torch.Tensor, output: torch.Tensor, jobs: list[str], ctx: StepContext):
        if len(jobs) == 1 and ctx.rows[jobs[0]] is None:  # single-job batch
            job = self.jobs[jobs[0]]
            xj, route, sel = self._adapter_input(job, name, x, output, ctx)
            if ctx.grid is not None:
                self.layout.observe(name, xj, ctx.grid[0])
            return None if name in ctx.merged else call(job.adapters[name], xj, route, sel)
        # a mixed batch: each run of one job's rows through that job's adapter, one call per run
        # (no per-row copies of A and B), and zeros for rows whose job does not adapt this site
        xs = {j: self._adapter_input(self.jobs[j], name, x, output, ctx) for j in jobs}
        sizes = [end - start for start, end, _ in ctx.runs]
        first = next(iter(xs.values()))[0]
        self.layout.observe(name, first, sum(sizes))
        if not self.layout.one_row_per_row(name, first, sum(sizes)):  # e.g. an MoE expert reading (B*T, H)
            raise ValueError(f"site `{name}` reads an input of shape {tuple(first.shape)}, not one row per batch "
                             f"row ({sum(sizes)}): a mixed batch cannot tell its jobs' rows apart; step its jobs alone")
        if all(j in xs and xs[j][0] is first and xs[j][1] is None and xs[j][2] is None for *_, j in ctx.runs):
            adapters = [self.jobs[j].adapters[name] for *_, j in ctx.runs]
            if stackable(adapters, first, sizes):  # LoRA of one shape: two batched matmuls for all runs
                return stacked_delta(adapters, first)
        # one split, not a slice per run: a slice's backward fills a whole-batch gradient with zeros
        pieces = first.split(sizes) if all(v[0] is first for v in xs.values()) else [
            xs[j][0][start:end] if j in xs else None for start, end, j in ctx.runs]
        parts = []
        for (start, end, j), piece in zip(ctx.runs, pieces):
            if j in xs:
                route, sel = (None if t is None else t[start:end] for t in xs[j][1:])
                parts.append(call(self.jobs[j].adapters[name], piece, route, sel))
            else:
                parts.append(output.new_zeros((end - start, *output.shape[1:])))
        return torch.cat(parts)

    def _adapter_input(self, job: HostedJob, name: str, x: torch.Tensor, output: torch.Tensor,
                       ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The input the adapter sees — the site's input x (parallel) or its output h (sequential),
        after the adapter's dropout (the device fits that) —, each token's type (routing kinds) and
        the tokens it acts on (conditional kinds)."""
        adapter = job.adapters[name]
        route = adapter.route(x) if adapter.spec.routes else None  # types come from the site's own input
        if adapter.spec.attach == "sequential":
            x = output
        p = adapter.spec.dropout
        if p > 0 and ctx.capture:
            x = F.dropout(x, p, training=True)
        mask = ctx.mask if ctx.mask is not None and tuple(ctx.mask.shape) == tuple(x.shape[:2]) else None
        sel = adapter.select(x, mask)
        if ctx.capture:
            kept, job_id = ctx.captured, job.spec.job_id
            if not ctx.recomputing:  # which input the site reads: sites sharing one travel together
                kept.group[(job_id, name)] = number = _input_number(kept, x)
                kept.forms[(job_id, number)] = (x.shape, x.dtype, x.device)
                if route is not None:
                    kept.routes[(job_id, name)] = route
                if sel is not None:
                    kept.selected[(job_id, name)] = sel
            if name not in ctx.recomputed or ctx.recomputing:  # kept until its packets leave, once per input
                key = (job_id, kept.group[(job_id, name)])
                if key not in kept.sent:  # (a later site of a group that already left keeps nothing)
                    kept.inputs.setdefault(key, x.detach())
                    if ctx.recomputing and ctx.stream is not None:
                        ctx.stream.input_kept(key)
        return x, route, sel


def _input_number(kept, x: torch.Tensor) -> int:
    """The same number for the same tensor (q_proj and v_proj read one), a new one for another. By
    identity, checked through a weak reference: a freed input's id (or its memory) may be reused
    within the forward, and under checkpointing nothing keeps the input alive."""
    seen = kept.seen.get(id(x))
    if seen is not None and seen[0]() is x:
        return seen[1]
    kept.numbered += 1  # (not len(seen): a reused id replaces its entry)
    kept.seen[id(x)] = (weakref.ref(x), kept.numbered)
    return kept.numbered


def call(adapter: Adapter, x: torch.Tensor, route: torch.Tensor | None, sel: torch.Tensor | None) -> torch.Tensor:
    """The adapter's delta on x; routing kinds also get each token's type; conditional kinds act only
    on their selected tokens (a 0/1 factor: the others get exactly zero, and no gradient through f).
    The adapter computes in its own dtype (float32 on a bf16 model, as PEFT does), as the device fits."""
    p = next(adapter.parameters(), None)
    if p is not None and x.is_floating_point() and x.dtype != p.dtype:
        x = x.to(p.dtype)
    delta = adapter(x) if route is None else adapter(x, route)
    return delta if sel is None else delta * sel.unsqueeze(-1).to(delta.dtype)
