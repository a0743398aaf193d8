"""The learner: the device-side state of one (job, site) — adapter, optimizer, the buffer of `I` steps.

    learner = Learner(spec, site)
    update = learner.consume(packet)     # None until `I` packets are in; then one fit, one Update
    learner.state()                      # LearnerState: what another worker needs to continue exactly
    learner.restore(state)               # continue from a state (exactly when it carries the optimizer)

A learner state has one plain form, `state_to_dict` / `state_from_dict` (tensors and plain values:
what checkpoints store and the server's state dir writes), and one wire form (`colaflow.wire.serde`).
"""
from __future__ import annotations

import torch

from ..adapters.base import build_adapter, load_params, params_of
from ..job import JobSpec
from ..sites import Site
from .fit import check_packet, check_stats, fit, site_seed, update_fault
from .messages import LearnerState, OptimizerState, Packet, Update


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
        if (packet.stats is not None) != (self.spec.packets == "projected"):
            raise ValueError(f"site `{self.site.name}` of job {packet.job!r} takes {self.spec.packets} packets, "
                             f"not {'projected' if packet.stats is not None else 'full'} ones")
        if packet.stats is not None:
            check_stats(packet, self.site, self.adapter.stat_shapes())
        else:
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
        pairs = [p.stats if p.stats is not None else
                 (p.x.to(device), p.g.to(device), None if p.route is None else p.route.to(device)) for p in self.buffer]
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


# the one plain form of a learner state (and of an update, which carries one): flat tensors and a
# JSON-able map. Worker checkpoints and the server's state dir store it; the wire has its own frames.

def state_to_flat(s: LearnerState) -> tuple[dict[str, torch.Tensor], dict]:
    """({"params/NAME": t, "optimizer/NAME/KEY": t}, {"version", "optimizer": meta | None})."""
    tensors = {f"params/{k}": v for k, v in s.params.items()}
    if s.optimizer is not None:
        tensors |= {f"optimizer/{k}": v for k, v in s.optimizer.tensors.items()}
    return tensors, {"version": s.version, "optimizer": None if s.optimizer is None else s.optimizer.meta}


def state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> LearnerState:
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    optimizer = None
    if meta.get("optimizer") is not None:
        optimizer = OptimizerState({k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")},
                                   meta["optimizer"])
    return LearnerState(int(meta["version"]), params, optimizer)


_UPDATE_FIELDS = ("job", "site", "loss", "fitted_through", "grad_norm", "lr")


def update_to_flat(u: Update) -> tuple[dict[str, torch.Tensor], dict]:
    """An update in the same plain form: its parameters and optimizer state as a learner state's, and
    its other fields in the map."""
    tensors, meta = state_to_flat(LearnerState(u.version, u.params, u.optimizer))
    return tensors, meta | {k: getattr(u, k) for k in _UPDATE_FIELDS}


def update_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> Update:
    s = state_from_flat(tensors, meta)
    return Update(meta["job"], meta["site"], s.version, s.params, meta["loss"], meta["fitted_through"], s.optimizer,
                  meta["grad_norm"], meta["lr"])
