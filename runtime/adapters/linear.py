"""Linear: a full linear map on the site's input, zero at first: delta = dW x (+ db).

The device's fit of it is the site weight's own gradient; it merges into the frozen weight, and a
classification job's head (`WithHead`) is one, with its bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Site
from .base import Adapter, AdapterSpec, check_dropout, register_adapter


@dataclass(frozen=True)
class Linear(AdapterSpec):
    """A full linear map on the site's input, zero-initialised: delta = dW x (+ db)."""

    kind: ClassVar[str] = "linear"
    linear: ClassVar[bool] = True
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_dropout(self.dropout)


class LinearAdapter(Adapter):
    def __init__(self, spec: Linear, site: Site):
        super().__init__(spec, site)
        fin, fout = site.in_features, site.out_features
        shape = (fout, fin, *site.conv["kernel_size"]) if site.kind == "conv2d" else (fout, fin)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(fout)) if spec.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.site.kind
        if kind == "embedding":
            d = F.embedding(x, self.weight.T)  # (..., out)
            return d + self.bias if self.bias is not None else d
        if kind == "conv2d":
            c = self.site.conv
            return F.conv2d(x, self.weight, self.bias, c["stride"], c["padding"], c["dilation"])
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)

    def delta_weight(self):
        dw = self.weight.T if self.site.kind in ("conv1d", "embedding") else self.weight
        return dw, self.bias


    # projected packets: dW = G^T X (out, in), db = sum of g: smaller than X and G once N > in out / (in + out)

    def project(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        x, g = x.to(self.weight.dtype), g.to(self.weight.dtype)  # (N, in), (N, out)
        stats = {"m": g.T @ x}  # (out, in)
        if self.bias is not None:
            stats["gsum"] = g.sum(0)  # (out,)
        return stats

    def stat_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"m": tuple(self.weight.shape)}
        if self.bias is not None:
            shapes["gsum"] = tuple(self.bias.shape)
        return shapes

    def accumulate(self, stats: dict[str, torch.Tensor]) -> None:
        for p, name in ((self.weight, "m"), (self.bias, "gsum")):
            if p is not None:
                grad = stats[name].to(p.device, p.dtype)
                p.grad = grad if p.grad is None else p.grad + grad


register_adapter(Linear, LinearAdapter)
