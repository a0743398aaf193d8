"""Houlsby bottleneck (Houlsby et al. 2019), attached sequentially: the model continues with h + f(h).

    Houlsby(hidden=64)    # after the attention output and the MLP down projection of every block

f(h) = W_up act(W_down h + b_down) + b_up, with W_up and b_up zero: it starts as the identity, and
the device fits it from (h, g) alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..sites import Site, family_of
from .base import ACTIVATIONS, Adapter, AdapterSpec, check_dropout, register_adapter

# Houlsby's two places per block: after the attention output projection and after the MLP down
# projection ("output.dense" is both of BERT's; "c_proj" both of GPT-2's).
HOULSBY_TARGETS: dict[str, list[str]] = {
    "llama": ["o_proj", "down_proj"],
    "gpt2": ["c_proj"],
    "bert": ["output.dense"],
}


@dataclass(frozen=True)
class Houlsby(AdapterSpec):
    """Houlsby bottleneck: f(h) = W_up act(W_down h + b_down) + b_up; W_up, b_up zero (identity start)."""

    kind: ClassVar[str] = "houlsby"
    hidden: int = 64  # m, the bottleneck width
    activation: str = "gelu"
    dropout: float = 0.0
    attach: str = field(default="sequential", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.hidden, int) or isinstance(self.hidden, bool) or self.hidden < 1:
            raise ValueError(f"`hidden` must be a positive int, got {self.hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        check_dropout(self.dropout)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        family = family_of(model)
        if family not in HOULSBY_TARGETS:
            raise ValueError(f"no default houlsby `target_modules` for model family {family!r}; pass them "
                             f"explicitly (known families: {sorted(HOULSBY_TARGETS)})")
        return HOULSBY_TARGETS[family]

    def view(self, site: Site) -> Site:
        if self.attach == "parallel" and site.kind not in ("linear", "conv1d"):
            raise ValueError(f"site `{site.name}`: a parallel houlsby adapter reads hidden states "
                             f"(linear, conv1d sites), not a {site.kind} site's input")
        return super().view(site)


class HoulsbyAdapter(Adapter):
    def __init__(self, spec: Houlsby, site: Site):
        super().__init__(spec, site)
        self.down = nn.Linear(site.in_features, spec.hidden)  # PyTorch's default (Kaiming-uniform) init
        self.act = ACTIVATIONS[spec.activation]()
        self.up = nn.Linear(spec.hidden, site.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))  # (..., d) -> (..., m) -> (..., d)


register_adapter(Houlsby, HoulsbyAdapter)
