"""LowRank (LoRA, Hu et al. 2021): delta = (alpha / r) * B A x, with PEFT's initialisation.

A is Kaiming-uniform and B zero (for an embedding site A zero and B normal, as PEFT's
`lora_embedding_A/B`), so the adapter starts as the identity; conv2d sites get a conv A and a 1x1 B.
It merges into the frozen weight (`delta_weight`) and exports as a PEFT LoRA directory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..sites import Site
from .base import Adapter, AdapterSpec, check_dropout, register_adapter


@dataclass(frozen=True)
class LowRank(AdapterSpec):
    """LoRA: delta = (alpha / r) * B A x, A Kaiming-uniform, B zero."""

    kind: ClassVar[str] = "lowrank"
    linear: ClassVar[bool] = True
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be a positive int, got {self.r!r}")
        check_number("alpha", self.alpha)
        if not self.alpha > 0:
            raise ValueError(f"`alpha` must be > 0, got {self.alpha!r}")
        check_dropout(self.dropout)


class LowRankAdapter(Adapter):
    def __init__(self, spec: LowRank, site: Site):
        super().__init__(spec, site)
        self.scaling = spec.alpha / spec.r
        r, fin, fout = spec.r, site.in_features, site.out_features
        if site.kind == "embedding":  # PEFT's lora_embedding_A/B: A zero, B normal
            self.A = nn.Parameter(torch.zeros(r, fin))
            self.B = nn.Parameter(torch.randn(fout, r))
        elif site.kind == "conv2d":
            k = site.conv["kernel_size"]
            self.A = nn.Parameter(torch.empty(r, fin, *k))
            self.B = nn.Parameter(torch.zeros(fout, r, 1, 1))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            self.A = nn.Parameter(torch.empty(r, fin))
            self.B = nn.Parameter(torch.zeros(fout, r))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.site.kind
        if kind == "embedding":
            return F.embedding(x, self.A.T) @ self.B.T * self.scaling  # (..., r) -> (..., out)
        if kind == "conv2d":
            c = self.site.conv
            h = F.conv2d(x, self.A, None, c["stride"], c["padding"], c["dilation"])  # (B, r, H', W')
            return F.conv2d(h, self.B) * self.scaling  # (B, out, H', W')
        return F.linear(F.linear(x, self.A), self.B) * self.scaling  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self):
        r = self.spec.r
        dw = (self.B.reshape(self.B.shape[0], r) @ self.A.reshape(r, -1)) * self.scaling  # (out, in*k)
        kind = self.site.kind
        if kind == "conv2d":
            return dw.reshape(self.site.out_features, self.site.in_features, *self.site.conv["kernel_size"]), None
        if kind in ("conv1d", "embedding"):  # both store the weight as (in, out)
            return dw.T, None
        return dw, None


    # projected packets: dB = s G^T (X A^T), dA = s (G B)^T X: r (in + out) numbers a step, not N (in + out)

    def project(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        x, g = x.to(self.A.dtype), g.to(self.A.dtype)  # (N, in), (N, out)
        return {"pa": (g @ self.B).T @ x,  # (r, N) @ (N, in) -> (r, in)
                "pb": g.T @ (x @ self.A.T)}  # (out, N) @ (N, r) -> (out, r)

    def stat_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"pa": tuple(self.A.shape), "pb": tuple(self.B.shape)}

    def accumulate(self, stats: dict[str, torch.Tensor]) -> None:
        for p, name in ((self.A, "pa"), (self.B, "pb")):
            grad = stats[name].to(p.device, p.dtype) * self.scaling
            p.grad = grad if p.grad is None else p.grad + grad


register_adapter(LowRank, LowRankAdapter)
