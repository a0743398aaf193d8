"""The base of every adapter kind: the spec, the module, and the one registry of kinds.

Each kind is a spec dataclass (what a user writes: `LowRank(r=8, alpha=8)`) and a module built
from the spec and the site, in a module of its own in this package; the package's `__init__`
imports them, and each registers itself with `register_adapter`, as PEFT's tuners do. Every
adapter starts as the identity of the adapted model: its output `delta = f(x)` is 0 at first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..checks import check_number
from ..sites import Site

_REGISTRY: dict[str, tuple[type, type]] = {}


def register_adapter(spec_cls: type, module_cls: type) -> None:
    """Register an adapter kind; refuses a kind that is already taken."""
    kind = spec_cls.kind
    if kind in _REGISTRY:
        raise ValueError(f"adapter kind {kind!r} is already registered")
    _REGISTRY[kind] = (spec_cls, module_cls)


def adapter_kinds() -> list[str]:
    return sorted(_REGISTRY)


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
    blackbox: ClassVar[bool] = False  # the server runs a forward only (black-box output mode, SmallLM)
    linear: ClassVar[bool] = False  # delta is linear in x through a product of its parameters (LoRA, linear)
    attach: str = field(default="parallel", kw_only=True)

    def __post_init__(self):
        if self.attach not in ATTACH:
            raise ValueError(f"`attach` must be one of {ATTACH}, got {self.attach!r}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> AdapterSpec:
        d = dict(d)
        kind = d.pop("kind", None)
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
        """Whether delta folds into the site's weight: a linear map of x, no dropout, attached in parallel."""
        return self.linear and getattr(self, "dropout", 0.0) == 0.0 and self.attach == "parallel"

    @property
    def projectable(self) -> bool:
        """Whether the fit depends on a step's (x, g) only through statistics the server can send
        instead (`Adapter.project`): exact for maps linear in their parameters' products (LoRA, linear)."""
        return self.linear

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
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def check_dropout(p: float) -> None:
    check_number("dropout", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {p}")


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

    # projected packets: the server sends the fit's sufficient statistics of (x, g), not x and g

    def project(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics of tokens x (N, in) and gradients g (N, out) that `accumulate` needs (the
        server computes them with its copy, which at staleness 0 is the version the device fits)."""
        raise NotImplementedError(f"{self.spec.kind} adapters take full packets")

    def stat_shapes(self) -> dict[str, tuple[int, ...]]:
        """The name and shape of every statistic `project` makes (a packet is checked against them)."""
        raise NotImplementedError(f"{self.spec.kind} adapters take full packets")

    def accumulate(self, stats: dict[str, torch.Tensor]) -> None:
        """Add the parameter gradient of one step's statistics to `.grad` (what J^T g would add)."""
        raise NotImplementedError(f"{self.spec.kind} adapters take full packets")


def build_adapter(spec: AdapterSpec, site: Site, seed: int | None = None) -> Adapter:
    """A fresh adapter of `spec`'s kind for `site` (seeded, so server and device agree)."""
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


def param_shapes(spec: AdapterSpec, site: Site) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of `spec`'s adapter at `site`, built on the meta device (no memory)."""
    with torch.device("meta"):
        adapter = build_adapter(spec, site)
    return {n: tuple(p.shape) for n, p in adapter.named_parameters()}
