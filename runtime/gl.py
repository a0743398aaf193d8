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

from .adapters import Adapter, build_adapter, load_params, params_of
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
    route: torch.Tensor | None = None  # (N,) uint8 token types, for routing kinds only (AdaLink's token_types)


@dataclass
class OptimizerState:
    """An optimizer's and its schedule's state, in a form that travels: tensors plus a plain map.

    `tensors` are keyed `"<param name>/<key>"` (AdamW: `A/exp_avg`, `A/exp_avg_sq`, `A/step`);
    `meta` holds the parameter groups, the LR schedule and any non-tensor per-parameter value.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict


@dataclass
class LearnerState:
    """A learner's state at a fit boundary: what another worker needs to continue it exactly."""

    version: int
    params: dict[str, torch.Tensor]
    optimizer: OptimizerState | None = None  # None: parameters only; the loader starts a fresh optimizer


@dataclass
class Update:
    """What the owner sends back: the full new parameters, so applying it twice is harmless."""

    job: str
    site: str
    version: int
    params: dict[str, torch.Tensor]
    loss: float  # 0.5 * ||g||^2 summed over the fitted packets: the GL objective at the fit (black-box: the
    # combined cross-entropy, summed over the fitted packets)
    fitted_through: int = -1  # the last step folded into this version: version * I - 1
    optimizer: OptimizerState | None = None  # the learner's full state rides along every `state_every` fits
    grad_norm: float = 0.0  # L2 norm of the fit's parameter gradient (summed over its I steps, before clipping)
    lr: float = 0.0  # the learning rate the fit's optimizer step used (0: not reported)


@dataclass
class FitStats:
    """What one `fit` reports: the GL loss, the gradient norm before clipping, the learning rate used."""

    loss: float
    grad_norm: float
    lr: float


def check_packet(packet: Packet, site: Site, routes: int = 0) -> None:
    """Refuse a packet whose tensors do not fit `site` (and an adapter routing between `routes`
    token types) or hold non-finite values."""
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
    """One optimizer step on the summed GL loss of `pairs` [(x, g) or (x, g, route), ...]; its loss, gradient norm and lr."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    dtype = next(adapter.parameters()).dtype
    for x, g, *route in pairs:
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


class Learner:
    """The device-side state of one (job, site): adapter, optimizer, the buffer of `I` steps."""

    def __init__(self, spec: JobSpec, site: Site, device: str | torch.device = "cpu"):
        self.spec, self.site = spec, site
        self.adapter = build_adapter(spec.adapter, site, seed=site_seed(spec, site)).to(device)
        self.optimizer, self.scheduler = spec.optimizer.build(self.adapter.parameters())
        self.version = 0
        self.buffer: list[Packet] = []

    @property
    def fitted_through(self) -> int:
        """The last step folded into the current version (-1: none)."""
        return self.version * self.spec.fit_interval - 1

    def consume(self, packet: Packet) -> Update | None:
        """Take one packet; after `I` of them, fit once and return the update."""
        check_packet(packet, self.site, self.spec.adapter.routes)
        if packet.job != self.spec.job_id or packet.site != self.site.name:
            raise ValueError(f"packet for ({packet.job!r}, `{packet.site}`) sent to the learner of "
                             f"({self.spec.job_id!r}, `{self.site.name}`)")
        want = self.fitted_through + len(self.buffer) + 1
        if packet.step != want:
            raise ValueError(f"site `{self.site.name}` of job {packet.job!r}: packet of step {packet.step} "
                             f"arrived where step {want} was due")
        self.buffer.append(packet)
        if len(self.buffer) < self.spec.fit_interval:
            return None
        device = next(self.adapter.parameters()).device
        pairs = [(p.x.to(device), p.g.to(device), None if p.route is None else p.route.to(device))
                 for p in self.buffer]
        prev = params_of(self.adapter)
        stats = fit(self.adapter, self.optimizer, self.scheduler, pairs, self.spec.optimizer.clip_norm)
        params = params_of(self.adapter)
        why = update_fault(params, prev)
        if why:  # sent, it would get an honest worker quarantined (and its other jobs moved) for the spec's fault
            raise ValueError(f"site `{self.site.name}`: the fit of version {self.version + 1} gave {why} "
                             f"(is the learning rate {self.spec.optimizer.lr:g} too high?)")
        self.buffer.clear()
        self.version += 1
        every = self.spec.state_every
        state = self.optimizer_state() if every and self.version % every == 0 else None
        return Update(self.spec.job_id, self.site.name, self.version, params, stats.loss,
                      self.fitted_through, state, stats.grad_norm, stats.lr)

    # state that outlives the device

    def state(self) -> LearnerState:
        """The full state at the current version (the `I`-buffer is not part of it)."""
        return LearnerState(self.version, params_of(self.adapter), self.optimizer_state())

    def optimizer_state(self) -> OptimizerState:
        names = [n for n, _ in self.adapter.named_parameters()]
        sd = self.optimizer.state_dict()
        tensors, values = {}, {}
        for index, per_param in sd["state"].items():
            for key, v in per_param.items():
                if torch.is_tensor(v):
                    tensors[f"{names[index]}/{key}"] = v.detach().clone()
                else:
                    values[f"{names[index]}/{key}"] = v
        return OptimizerState(tensors, {"groups": sd["param_groups"], "values": values,
                                        "schedule": self.scheduler.state_dict()})

    def restore(self, state: LearnerState) -> None:
        """Continue from `state`: exactly when it carries the optimizer, else with a fresh one."""
        load_params(self.adapter, state.params)
        self.version, self.buffer = state.version, []
        if state.optimizer is None:
            self.optimizer, self.scheduler = self.spec.optimizer.build(self.adapter.parameters())
            self.scheduler.last_epoch = state.version  # the LR schedule still follows the fit count
            factor = self.spec.optimizer.schedule.factor(state.version)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            return
        names = [n for n, _ in self.adapter.named_parameters()]
        per_param: dict[int, dict] = {}
        try:  # cloned: the optimizer updates its state in place, and the given state may be shared or read-only
            tensors = {k: v.clone() for k, v in state.optimizer.tensors.items()}
            for key, v in {**tensors, **state.optimizer.meta["values"]}.items():
                name, _, field = key.rpartition("/")
                per_param.setdefault(names.index(name), {})[field] = v
            self.optimizer.load_state_dict({"state": per_param, "param_groups": state.optimizer.meta["groups"]})
            self.scheduler.load_state_dict(dict(state.optimizer.meta["schedule"]))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"site `{self.site.name}` of job {self.spec.job_id!r}: the optimizer state of "
                             f"version {state.version} does not fit a {self.spec.optimizer.kind} optimizer "
                             f"({type(e).__name__}: {e})") from None


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
