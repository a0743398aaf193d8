"""Optimizer and schedule specs for the device-side fit; the server never builds one.

    AdamW(lr=3e-4, weight_decay=0.01, schedule=Schedule("linear", warmup=10, total=100), clip_norm=1.0)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from ..checks import check_number

SCHEDULES = ("constant", "linear", "cosine")
_REGISTRY: dict[str, type] = {}


def register_optimizer(spec_cls: type) -> None:
    """Register an optimizer kind (an `OptimizerSpec` subclass); refuses a kind that is already taken."""
    kind = getattr(spec_cls, "kind", "")
    if not kind or not (isinstance(spec_cls, type) and issubclass(spec_cls, OptimizerSpec)):
        raise ValueError(f"{spec_cls!r} is not an OptimizerSpec subclass with a `kind`")
    if kind in _REGISTRY:
        raise ValueError(f"optimizer kind {kind!r} is already registered")
    _REGISTRY[kind] = spec_cls


def optimizer_kinds() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier per fit: constant, or linear warm-up then linear / cosine decay to 0."""

    kind: str = "constant"
    warmup: int = 0
    total: int = 0  # fits over which to decay; needed by linear and cosine

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"`schedule` kind must be one of {SCHEDULES}, got {self.kind!r}")
        check_number("warmup", self.warmup)
        check_number("total", self.total)
        if self.warmup < 0 or self.total < 0:
            raise ValueError(f"`warmup` and `total` must be >= 0, got {self.warmup}, {self.total}")
        if self.kind != "constant" and self.total <= self.warmup:
            raise ValueError(f"a {self.kind} schedule needs `total` > `warmup`, got total={self.total}, "
                             f"warmup={self.warmup}")

    def factor(self, fit: int) -> float:
        """The multiplier of the base learning rate for fit number `fit` (0-based)."""
        if fit < self.warmup:
            return (fit + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (fit - self.warmup) / (self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimizerSpec:
    kind: ClassVar[str] = ""
    lr: float = 3e-4
    weight_decay: float = 0.0
    clip_norm: float | None = None  # max gradient norm per adapter (a device sees only its own)
    schedule: Schedule = field(default_factory=Schedule)

    def _check(self):
        for name in ("lr", "weight_decay") + (("clip_norm",) if self.clip_norm is not None else ()):
            check_number(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"`clip_norm` must be > 0 or None, got {self.clip_norm!r}")
        if isinstance(self.schedule, dict):
            try:
                object.__setattr__(self, "schedule", Schedule(**self.schedule))
            except TypeError as e:
                raise ValueError(f"bad `schedule` {self.schedule}: {e}") from None
        elif not isinstance(self.schedule, Schedule):
            raise ValueError(f"`schedule` must be a map {{kind, warmup, total}}, got {self.schedule!r}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> OptimizerSpec:
        d = dict(d)
        kind = d.pop("kind", None)
        if kind not in _REGISTRY:
            raise ValueError(f"unknown optimizer `kind` {kind!r}; known: {optimizer_kinds()}")
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        try:
            return _REGISTRY[kind](**d)
        except TypeError as e:
            raise ValueError(f"bad {kind} optimizer spec {d}: {e}") from None

    def build(self, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """A torch optimizer over `params` and its per-fit schedule."""
        opt = self._build(list(params))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self.schedule.factor)

    def _build(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError


@dataclass(frozen=True)
class AdamW(OptimizerSpec):
    kind: ClassVar[str] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        self._check()
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}")
        for b in self.betas:
            check_number("betas", b)
            if not 0 <= b < 1:
                raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}")
        check_number("eps", self.eps)
        if not self.eps > 0:
            raise ValueError(f"`eps` must be > 0, got {self.eps!r}")

    def _build(self, params):
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)


@dataclass(frozen=True)
class Adam(AdamW):
    kind: ClassVar[str] = "adam"

    def _build(self, params):
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=self.weight_decay)


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    kind: ClassVar[str] = "sgd"
    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        self._check()
        check_number("momentum", self.momentum)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("`nesterov` needs `momentum` > 0")

    def _build(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                               weight_decay=self.weight_decay)


for _cls in (AdamW, Adam, SGD):
    register_optimizer(_cls)
