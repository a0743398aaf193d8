"""AdaLink (Wang et al. 2024): a low-rank map on the token-embedding output, one per token type.

    AdaLink(r=4)                            # one adapter for every token
    AdaLink(r=4, token_types=((500, 600),)) # one for ids 500..599 (say image tokens), one for the rest

Attached sequentially (h + f(h)) and zero at first. Token types are decided on the server from the
embedding's own input (the token ids); a packet carries one byte per token saying which adapter
acts on it (`Packet.route`), and nothing else that LoRA's packet does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Site, input_embedding_name
from .base import Adapter, AdapterSpec, check_dropout, register_adapter

MAX_RANGES = 16  # token-type ranges of one adapter: each costs a pass per step, whatever its size


@dataclass(frozen=True)
class AdaLink(AdapterSpec):
    """AdaLink: f(h) = (alpha / r) B_t A_t h on the token-embedding output, t = the token's type.

    `token_types`: half-open token-id ranges ((lo, hi), ...); type i + 1 adapts the ids of range i,
    type 0 every other id. Empty: one adapter for every token.
    """

    kind: ClassVar[str] = "adalink"
    r: int = 8
    alpha: float = 8.0
    token_types: tuple = ()
    dropout: float = 0.0
    attach: str = field(default="sequential", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.attach != "sequential":
            raise ValueError(f"`attach` of an adalink adapter must be 'sequential' (it reads the embedding "
                             f"output), got {self.attach!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"`r` must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"`alpha` must be > 0, got {self.alpha!r}")
        check_dropout(self.dropout)
        try:  # msgpack gives lists back: keep one hashable, comparable form
            ranges = tuple((int(lo), int(hi)) for lo, hi in self.token_types)
        except (TypeError, ValueError):
            raise ValueError(f"`token_types` must be (lo, hi) token-id ranges, got {self.token_types!r}") from None
        if len(ranges) > MAX_RANGES:  # each type is one more masked pass per step, on the server and the device
            raise ValueError(f"`token_types` has {len(ranges)} ranges; at most {MAX_RANGES}")
        for lo, hi in ranges:
            if not 0 <= lo < hi:
                raise ValueError(f"`token_types` range ({lo}, {hi}) must satisfy 0 <= lo < hi")
        for (lo1, hi1), (lo2, hi2) in zip(sorted(ranges), sorted(ranges)[1:]):
            if lo2 < hi1:
                raise ValueError(f"`token_types` ranges ({lo1}, {hi1}) and ({lo2}, {hi2}) overlap")
        object.__setattr__(self, "token_types", ranges)

    @property
    def routes(self) -> int:
        return len(self.token_types) + 1 if self.token_types else 0

    def default_targets(self, model: nn.Module) -> list[str] | None:
        return [input_embedding_name(model)]

    def view(self, site: Site) -> Site:
        if self.token_types and site.kind != "embedding":
            raise ValueError(f"site `{site.name}`: adalink `token_types` are read from token ids, so its "
                             f"site must be an embedding, not a {site.kind} site")
        return super().view(site)


class AdaLinkAdapter(Adapter):
    def __init__(self, spec: AdaLink, site: Site):
        super().__init__(spec, site)
        self.types = max(1, spec.routes)
        self.scaling = spec.alpha / spec.r
        d_in, d_out = site.in_features, site.out_features
        self.A = nn.Parameter(torch.empty(self.types, spec.r, d_in))  # (types, r, d)
        self.B = nn.Parameter(torch.zeros(self.types, d_out, spec.r))  # (types, d, r): zero, identity start
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def route(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.spec.token_types:
            return None
        t = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)  # (B, T) token ids -> types
        for i, (lo, hi) in enumerate(self.spec.token_types, 1):
            t[(x >= lo) & (x < hi)] = i
        return t

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        if self.types == 1:
            return F.linear(F.linear(x, self.A[0]), self.B[0]) * self.scaling  # (..., d) -> (..., r) -> (..., d)
        if route is None:
            raise ValueError(f"site `{self.site.name}`: an adalink adapter with token types needs each token's `route`")
        out = x.new_zeros((*x.shape[:-1], self.B.shape[1]))
        for t in range(self.types):  # a 0/1 mask per type: a token's delta (and gradient) is its own type's
            mask = (route == t).unsqueeze(-1).to(x.dtype)  # (..., 1)
            out = out + mask * (F.linear(F.linear(x, self.A[t]), self.B[t]) * self.scaling)
        return out


register_adapter(AdaLink, AdaLinkAdapter)
