"""Adapters: the small trainable models a device owns, one per (job, site).

Each kind is a spec dataclass (what a user writes: `LowRank(r=8, alpha=8)`) and a module built
from the spec and the site. Every adapter starts as the identity of the adapted model: its output
`delta = f(x)` is 0 at initialisation. A new kind is one `register_adapter` call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .optim import check_number
from .sites import Site

_REGISTRY: dict[str, tuple[type, type]] = {}


def register_adapter(spec_cls: type, module_cls: type) -> None:
    """Register an adapter kind; refuses a kind that is already taken."""
    kind = spec_cls.kind
    if kind in _REGISTRY:
        raise ValueError(f"adapter kind {kind!r} is already registered")
    _REGISTRY[kind] = (spec_cls, module_cls)


def adapter_kinds() -> list[str]:
    _builtin()
    return sorted(_REGISTRY)


def _builtin() -> None:
    """Register the kinds that live in their own modules (colaflow's names load lazily)."""
    from . import bottleneck, classify, conditional, smalllm  # noqa: F401  (they register on import)


ATTACH = ("parallel", "sequential")


@dataclass(frozen=True)
class AdapterSpec:
    """Base of every adapter spec; `kind` names it in the registry and on the wire.

    `attach` says what the adapter reads. "parallel": the site's input x, and the model continues
    with h + f(x) (LoRA). "sequential": the site's output h, and the model continues with h + f(h)
    (Houlsby, AdaLink); the packet then carries h and g = dL/d(h + f(h)). Either way the device
    fits f on (input, g) alike. Keyword-only, so positional specs (`LowRank(8, 16)`) keep meaning.
    """

    kind: ClassVar[str] = ""
    attach: str = field(default="parallel", kw_only=True)

    def __post_init__(self):
        if self.attach not in ATTACH:
            raise ValueError(f"`attach` must be one of {ATTACH}, got {self.attach!r}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "AdapterSpec":
        d = dict(d)
        kind = d.pop("kind", None)
        if kind not in _REGISTRY:
            _builtin()
        if kind not in _REGISTRY:
            raise ValueError(f"unknown adapter `kind` {kind!r}; known: {adapter_kinds()}")
        spec_cls = _REGISTRY[kind][0]
        try:
            return spec_cls(**d)
        except TypeError as e:
            raise ValueError(f"bad {kind} adapter spec {d}: {e}") from None

    # Every kind has a `dropout` field. Dropout on the adapter's input is applied by the server,
    # which sends the dropped input, so the device fits exactly the function the forward used.

    @property
    def mergeable(self) -> bool:
        return False

    @property
    def routes(self) -> int:
        """How many token types the adapter routes between (0: none; packets then carry no `route`)."""
        return 0

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """Where this kind attaches when a job names no `target_modules` (None: the family's defaults)."""
        return None

    def view(self, site: Site) -> Site:
        """The site as this adapter sees it: the module's input side (parallel) or, sequential, its
        output h as a linear site d -> d. Raises for a site this attach cannot adapt."""
        if self.attach == "parallel":
            return site
        if site.kind == "conv2d":
            raise ValueError(f"site `{site.name}`: sequential attach adapts token-shaped outputs "
                             "(linear, conv1d, embedding sites), not conv2d feature maps")
        return Site(site.name, "linear", site.out_features, site.out_features)


MAX_LAYERS = 16  # layers of one adapter (mlp; smalllm's GRU layers too)


def _check_dropout(p: float) -> None:
    check_number("dropout", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {p}")


@dataclass(frozen=True)
class LowRank(AdapterSpec):
    """LoRA: delta = (alpha / r) * B A x, A Kaiming-uniform, B zero."""

    kind: ClassVar[str] = "lowrank"
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
        _check_dropout(self.dropout)

    @property
    def mergeable(self) -> bool:
        return self.dropout == 0.0 and self.attach == "parallel"


@dataclass(frozen=True)
class Linear(AdapterSpec):
    """A full linear map on the site's input, zero-initialised: delta = dW x (+ db)."""

    kind: ClassVar[str] = "linear"
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_dropout(self.dropout)

    @property
    def mergeable(self) -> bool:
        return self.dropout == 0.0 and self.attach == "parallel"


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


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
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        _check_dropout(self.dropout)


class Adapter(nn.Module):
    """Base of adapter modules: `forward(x) -> delta` with the site's output shape."""

    def __init__(self, spec: AdapterSpec, site: Site):
        super().__init__()
        self.spec, self.site = spec, site

    def route(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each token's type, from the site's own input (routing kinds only; see `AdapterSpec.routes`)."""
        return None

    def select(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) bool: the tokens this adapter acts on, for conditional kinds (CoDA); None: every token.
        `x` is the adapter's input, `mask` the batch's attention mask where it aligns with x."""
        return None

    def delta_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dW, db) in the site weight's own layout, for merging; only mergeable kinds."""
        raise NotImplementedError(f"{self.spec.kind} adapters cannot be merged")


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


class MLPAdapter(Adapter):
    def __init__(self, spec: MLP, site: Site):
        super().__init__(spec, site)
        if site.kind == "conv2d":
            raise ValueError(f"site `{site.name}`: the mlp adapter adapts linear, conv1d and embedding "
                             "sites, not conv2d (use lowrank or linear)")
        first = (nn.Embedding(site.in_features, spec.hidden) if site.kind == "embedding"
                 else nn.Linear(site.in_features, spec.hidden))
        body: list[nn.Module] = [first, _ACTIVATIONS[spec.activation]()]
        for _ in range(spec.layers - 2):
            body += [nn.Linear(spec.hidden, spec.hidden), _ACTIVATIONS[spec.activation]()]
        last = nn.Linear(spec.hidden, site.out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*body, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., in) -> (..., hidden) -> (..., out)


register_adapter(LowRank, LowRankAdapter)
register_adapter(Linear, LinearAdapter)
register_adapter(MLP, MLPAdapter)


def build_adapter(spec: AdapterSpec, site: Site, seed: int | None = None) -> Adapter:
    """A fresh adapter of `spec`'s kind for `site` (seeded, so server and device agree)."""
    if spec.kind not in _REGISTRY:
        _builtin()
    if spec.kind not in _REGISTRY:
        raise ValueError(f"unknown adapter kind {spec.kind!r}; known: {adapter_kinds()}")
    module_cls = _REGISTRY[spec.kind][1]
    if seed is None:
        return module_cls(spec, site)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (adapters are built on the CPU): torch.manual_seed would also seed
        # every accelerator's generator, which costs a traceback capture per call
        torch.default_generator.manual_seed(seed)
        return module_cls(spec, site)


def load_params(adapter: Adapter, params: dict[str, torch.Tensor]) -> None:
    """Copy `params` into `adapter`, refusing unknown names and wrong shapes with the site named."""
    check_params(adapter, params)
    own = dict(adapter.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)


def check_params(adapter: Adapter, params: dict[str, torch.Tensor]) -> None:
    """Raise unless `params` has exactly the adapter's names and shapes, all finite."""
    own = dict(adapter.named_parameters())
    site = adapter.site.name
    if set(params) != set(own):
        raise ValueError(f"site `{site}`: adapter parameters {sorted(params)} do not match the "
                         f"{adapter.spec.kind} adapter's {sorted(own)}")
    for name, value in params.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"site `{site}`: parameter `{name}` has shape {tuple(value.shape)}, "
                             f"the adapter expects {tuple(own[name].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"site `{site}`: parameter `{name}` holds non-finite values")


def params_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's parameters: the full state an update carries."""
    return {n: p.detach().clone() for n, p in adapter.named_parameters()}
