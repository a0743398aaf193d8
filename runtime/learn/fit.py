"""Gradient learning: the one `fit` every worker runs (in-process, edge daemon, Ray actor).

For a packet (x, g) of one site, the device fits its adapter f by one optimizer step on

    0.5 * sum || f(x) - stopgrad(f(x) - g) ||^2

whose parameter gradient is exactly J_f(x)^T g — what backprop through the whole model gives the
adapter (PEFT LoRA's gradient). The residual f(x) - stopgrad(f(x) - g) equals g by construction,
so we hand g to autograd directly: the same gradient, without the cancellation error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.base import Adapter
from ..job import JobSpec
from ..sites import Site, check_shape
from .messages import Packet


@dataclass
class FitStats:
    """What one `fit` reports: the GL loss, the gradient norm before clipping, the learning rate used."""

    loss: float
    grad_norm: float
    lr: float


def check_stats(packet: Packet, site: Site, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a projected packet whose statistics are not exactly `shapes` (and `gsq`), all finite."""
    stats = packet.stats
    want = {**shapes, "gsq": (1,)}
    if packet.x is not None or packet.g is not None or packet.route is not None or set(stats) != set(want):
        raise ValueError(f"site `{site.name}`: a projected packet carries exactly {sorted(want)}, got "
                         f"{sorted(stats)}{' and an x or g' if packet.x is not None or packet.g is not None else ''}")
    for name, t in stats.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(f"site `{site.name}`: statistic `{name}` has shape {tuple(t.shape)}, the adapter "
                             f"expects {want[name]}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"site `{site.name}`: statistic `{name}` of job {packet.job!r} step {packet.step} "
                             "holds NaN or Inf values")


def check_packet(packet: Packet, site: Site, routes: int = 0) -> None:
    """Refuse a packet whose tensors do not fit `site` (and an adapter routing between `routes`
    token types) or hold non-finite values."""
    if packet.x is None or packet.g is None:
        raise ValueError(f"site `{site.name}`: a full packet carries `x` and `g`")
    check_shape(site, "x", packet.x, "x")
    check_shape(site, "g", packet.g, "g")
    if packet.x.shape[0] != packet.g.shape[0]:
        raise ValueError(f"site `{site.name}`: `x` has {packet.x.shape[0]} rows but `g` has {packet.g.shape[0]}")
    if not packet.g.is_floating_point() or not torch.isfinite(packet.g).all():
        raise ValueError(f"site `{site.name}`: gradient `g` of job {packet.job!r} step {packet.step} "
                         "holds NaN or Inf values")
    if packet.x.is_floating_point() and not torch.isfinite(packet.x).all():
        raise ValueError(f"site `{site.name}`: input `x` of job {packet.job!r} step {packet.step} "
                         "holds NaN or Inf values")
    r = packet.route
    if not routes:
        if r is not None:
            raise ValueError(f"site `{site.name}`: packet carries a `route` but the adapter routes no token types")
        return
    if r is None:
        raise ValueError(f"site `{site.name}`: packet has no `route`; the adapter routes {routes} token types")
    if r.dtype != torch.uint8 or tuple(r.shape) != (packet.x.shape[0],):
        raise ValueError(f"site `{site.name}`: `route` must be ({packet.x.shape[0]},) uint8, got "
                         f"{tuple(r.shape)} {r.dtype}")
    if r.numel() and int(r.max()) >= routes:
        raise ValueError(f"site `{site.name}`: `route` names token type {int(r.max())}; the adapter has {routes}")


def fit(adapter: Adapter, optimizer: torch.optim.Optimizer, scheduler, pairs: list[tuple],
        clip_norm: float | None = None) -> FitStats:
    """One optimizer step on the summed GL loss of `pairs` [(x, g) or (x, g, route) of full packets, or a
    projected packet's statistics, ...]; its loss, gradient norm and lr."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    dtype = next(adapter.parameters()).dtype
    for item in pairs:
        if isinstance(item, dict):  # a projected packet: the statistics of its tokens are the gradient
            adapter.accumulate(item)
            loss += float(item["gsq"].double().sum())
            continue
        x, g, *route = item
        if hasattr(adapter, "objective"):  # an output-site model (black-box mode) owns its loss
            loss += adapter.objective(x, g)
            continue
        x = x.to(dtype) if x.is_floating_point() else x
        delta = adapter(x) if not route or route[0] is None else adapter(x, route[0])  # (N, out): f(x)
        delta.backward(g.to(delta.dtype))  # grad of 0.5||f - sg(f - g)||^2 is J^T g
        loss += 0.5 * float(g.to(_wide(g)).pow(2).sum())
    grads = [p.grad.detach().to(_wide(p.grad)) for p in adapter.parameters() if p.grad is not None]
    grad_norm = float(sum(g.pow(2).sum() for g in grads)) ** 0.5  # before clipping, as PEFT users log it
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), clip_norm)
    lr = float(optimizer.param_groups[0]["lr"])  # the schedule's rate for this fit (scheduler.step moves it on)
    optimizer.step()
    scheduler.step()
    return FitStats(loss, grad_norm, lr)


MAX_PARAM_ABS = 1e4  # no adapter an honest worker trains gets near this; 1e30 is an attack or a blow-up
MAX_STEP_RATIO = 100.0  # nor does one fit move the parameters by 100x their norm (+1)


def update_fault(params: dict[str, torch.Tensor], prev: dict[str, torch.Tensor] | None) -> str:
    """Why `params` cannot be a fit from `prev` (non-finite, or finite but absurd), or "". The worker
    checks its own fit with it (and refuses the step: its job fails with the reason, as a too-high
    learning rate deserves); the server checks what arrives (and quarantines the sender)."""
    for name, v in params.items():
        if v.numel() and not torch.isfinite(v).all():
            return f"non-finite values in `{name}`"
    biggest = max((float(v.abs().max()) for v in params.values() if v.numel()), default=0.0)
    if biggest > MAX_PARAM_ABS:
        return f"a parameter of magnitude {biggest:.3g} (bound {MAX_PARAM_ABS:g})"
    if prev is not None:
        step = sum(float((params[k].double() - prev[k].double()).pow(2).sum()) for k in prev) ** 0.5
        norm = sum(float(prev[k].double().pow(2).sum()) for k in prev) ** 0.5
        if step > MAX_STEP_RATIO * (norm + 1.0):
            return f"a step of norm {step:.3g} from parameters of norm {norm:.3g}"
    return ""


def site_seed(spec: JobSpec, site: Site) -> int:
    """A per-(job, site) seed derived from the job's seed, stable across processes."""
    h = 0
    for ch in f"{spec.seed}:{site.name}":
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def _wide(t: torch.Tensor) -> torch.dtype:
    """float64 for the logged loss and norm, where the device has it (MPS has none)."""
    return torch.float32 if t.device.type == "mps" else torch.float64
