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

from .adapters import Adapter, build_adapter, params_of
from .job import JobSpec
from .sites import Site, check_shape


@dataclass
class Packet:
    """What the server sends the owner of (job, site) after one step."""

    job: str
    site: str
    step: int
    version: int  # adapter version the forward used
    x: torch.Tensor  # the adapter's input: (N, in), (N,) token ids, or (B, C, H, W)
    g: torch.Tensor  # dL/dh of the site output: (N, out) or (B, out, H', W')


@dataclass
class Update:
    """What the owner sends back: the full new parameters, so applying it twice is harmless."""

    job: str
    site: str
    version: int
    params: dict[str, torch.Tensor]
    loss: float  # 0.5 * ||g||^2 summed over the fitted packets: the GL objective at the fit


def check_packet(packet: Packet, site: Site) -> None:
    """Refuse a packet whose tensors do not fit `site` or hold non-finite values."""
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


def fit(adapter: Adapter, optimizer: torch.optim.Optimizer, scheduler, pairs: list[tuple[torch.Tensor, torch.Tensor]],
        clip_norm: float | None = None) -> float:
    """One optimizer step on the summed GL loss of `pairs` [(x, g), ...]; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    dtype = next(adapter.parameters()).dtype
    for x, g in pairs:
        x = x.to(dtype) if x.is_floating_point() else x
        delta = adapter(x)  # (N, out): f(x)
        delta.backward(g.to(delta.dtype))  # grad of 0.5||f - sg(f - g)||^2 is J^T g
        loss += 0.5 * float(g.double().pow(2).sum())
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    return loss


class Learner:
    """The device-side state of one (job, site): adapter, optimizer, the buffer of `I` steps."""

    def __init__(self, spec: JobSpec, site: Site, device: str | torch.device = "cpu"):
        self.spec, self.site = spec, site
        self.adapter = build_adapter(spec.adapter, site, seed=site_seed(spec, site)).to(device)
        self.optimizer, self.scheduler = spec.optimizer.build(self.adapter.parameters())
        self.version = 0
        self.buffer: list[Packet] = []

    def consume(self, packet: Packet) -> Update | None:
        """Take one packet; after `I` of them, fit once and return the update."""
        check_packet(packet, self.site)
        if packet.job != self.spec.job_id or packet.site != self.site.name:
            raise ValueError(f"packet for ({packet.job!r}, `{packet.site}`) sent to the learner of "
                             f"({self.spec.job_id!r}, `{self.site.name}`)")
        self.buffer.append(packet)
        if len(self.buffer) < self.spec.fit_interval:
            return None
        device = next(self.adapter.parameters()).device
        pairs = [(p.x.to(device), p.g.to(device)) for p in self.buffer]
        loss = fit(self.adapter, self.optimizer, self.scheduler, pairs, self.spec.optimizer.clip_norm)
        self.buffer.clear()
        self.version += 1
        return self.current(loss)

    def current(self, loss: float = 0.0) -> Update:
        """The full state at the current version, as an update (resent after a reconnect)."""
        return Update(self.spec.job_id, self.site.name, self.version, params_of(self.adapter), loss)

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume this learner exactly."""
        return {"version": self.version, "adapter": self.adapter.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "buffer": [(p.step, p.version, p.x, p.g) for p in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.buffer = [Packet(self.spec.job_id, self.site.name, s, v, x, g) for s, v, x, g in state["buffer"]]


def site_seed(spec: JobSpec, site: Site) -> int:
    """A per-(job, site) seed derived from the job's seed, stable across processes."""
    h = 0
    for ch in f"{spec.seed}:{site.name}":
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h
