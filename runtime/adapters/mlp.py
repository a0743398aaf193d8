"""MLP: a small MLP on the site's input; its last layer is zero, so it starts as the identity.

Nonlinear, so it neither merges nor exports to PEFT; its packets are the full (x, g).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..sites import Site
from .base import ACTIVATIONS, MAX_LAYERS, Adapter, AdapterSpec, check_dropout, register_adapter


@dataclass(frozen=True)
class MLP(AdapterSpec):
    """A small MLP on the site's input; its last layer is zero so it starts as the identity."""

    kind: ClassVar[str] = "mlp"
    hidden: int = 128
    layers: int = 2  # number of Linear layers, >= 2
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"`hidden` must be a positive int, got {self.hidden!r}")
        if not isinstance(self.layers, int) or not 2 <= self.layers <= MAX_LAYERS:
            # deep chains are cheap in parameters but not in time: every step of every tenant pays them
            raise ValueError(f"`layers` must be an int in [2, {MAX_LAYERS}], got {self.layers!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        check_dropout(self.dropout)


class MLPAdapter(Adapter):
    def __init__(self, spec: MLP, site: Site):
        super().__init__(spec, site)
        if site.kind == "conv2d":
            raise ValueError(f"site `{site.name}`: the mlp adapter adapts linear, conv1d and embedding "
                             "sites, not conv2d (use lowrank or linear)")
        first = (nn.Embedding(site.in_features, spec.hidden) if site.kind == "embedding"
                 else nn.Linear(site.in_features, spec.hidden))
        body: list[nn.Module] = [first, ACTIVATIONS[spec.activation]()]
        for _ in range(spec.layers - 2):
            body += [nn.Linear(spec.hidden, spec.hidden), ACTIVATIONS[spec.activation]()]
        last = nn.Linear(spec.hidden, site.out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*body, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., in) -> (..., hidden) -> (..., out)


register_adapter(MLP, MLPAdapter)
