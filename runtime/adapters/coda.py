"""CoDA-style conditional adapter (Lei et al., 2023): a learned router scores each token of a sequence,
and the bottleneck adapter acts only on the top k = ceil(n / reduction) tokens, scaled by their score:

    f(h_i) = sigmoid(w . h_i + b) * W_up act(W_down h_i)    for the k selected tokens of a row, else 0

Selection is decided on the server with the router's current version (the model then continues
with h + f(h)); a token that is not selected adds exactly nothing to J^T g, so the packet carries
only the selected tokens — about n / k fewer bytes — and the device fits router and bottleneck
together from them (the score multiplies f, so the router's gradient is g . f(h) * s' * h).
n is each row's count of real tokens (its attention mask) where the site is token-aligned with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..sites import Site, family_of
from .base import ACTIVATIONS, AdapterSpec, check_dropout, register_adapter
from .houlsby import HOULSBY_TARGETS, HoulsbyAdapter


@dataclass(frozen=True)
class CoDA(AdapterSpec):
    """Conditional adapter: a Houlsby bottleneck on the router's top n / `reduction` tokens per row."""

    kind: ClassVar[str] = "coda"
    hidden: int = 64
    reduction: int = 2  # k = ceil(n / reduction) tokens per row; 1: every token
    activation: str = "gelu"
    dropout: float = 0.0
    attach: str = field(default="sequential", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.attach != "sequential":  # a parallel input may be shared by sites selecting different tokens
            raise ValueError(f"`attach` of a coda adapter must be 'sequential', got {self.attach!r}")
        for name in ("hidden", "reduction"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        check_dropout(self.dropout)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        return HOULSBY_TARGETS.get(family_of(model))


class CoDAAdapter(HoulsbyAdapter):
    def __init__(self, spec: CoDA, site: Site):
        super().__init__(spec, site)
        self.router = nn.Linear(site.in_features, 1)  # random init: distinct scores, so no ties at the start

    def select(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) bool: the top ceil(n / reduction) tokens of each row by router score (x: (B, T, d))."""
        if x.dim() != 3:
            raise ValueError(f"site `{self.site.name}`: a coda adapter routes (B, T, d) hidden states, "
                             f"got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        with torch.no_grad():
            scores = self.router(x.to(self.router.weight.dtype)).squeeze(-1).float()  # (B, T); fp32 router, bf16 model
            n = torch.full((B,), T, device=x.device) if mask is None else mask.sum(1)  # (B,) real tokens
            if mask is not None:
                scores = scores.masked_fill(mask == 0, -math.inf)  # padding is never chosen
            k = torch.div(n + self.spec.reduction - 1, self.spec.reduction, rounding_mode="floor")  # (B,)
            order = scores.argsort(dim=1, descending=True, stable=True)  # (B, T): ties by position
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=x.device).expand(B, T))
            return rank < k[:, None]  # (B, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.router(x)) * super().forward(x)  # (..., 1) * (..., d)


register_adapter(CoDA, CoDAAdapter)
