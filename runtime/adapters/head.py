"""WithHead: the adapters of a classification job, a `body` kind on the model's sites and a `head`
kind (by default a biased linear map) on the frozen classifier head `score`.

A job has one adapter spec, so the head's own kind rides in this one; the module built at each site
is the plain kind's own (`for_site`), so merging, dropout and export see an ordinary adapter.
The classifier the server holds and the job specs that use this: `colaflow.engine.classify`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..sites import Site
from .base import AdapterSpec, build_adapter, register_adapter
from .linear import Linear
from .lowrank import LowRank

HEAD = "score"


@dataclass(frozen=True)
class WithHead(AdapterSpec):
    """Adapters for a classification job: `body` on the model's sites, `head` on the head site(s)."""

    kind: ClassVar[str] = "with_head"
    body: AdapterSpec = field(default_factory=LowRank)
    head: AdapterSpec = field(default_factory=lambda: Linear(bias=True))
    head_sites: tuple[str, ...] = (HEAD,)  # module-name suffixes that get `head`

    def __post_init__(self):
        for name in ("body", "head"):  # from a spec map (the wire, an export): nested maps
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, AdapterSpec.from_dict(value))
            elif not isinstance(value, AdapterSpec):
                raise ValueError(f"`{name}` must be an adapter spec, got {value!r}")
            if isinstance(getattr(self, name), WithHead):
                raise ValueError(f"`{name}` cannot itself be a with_head spec")
        sites = (self.head_sites,) if isinstance(self.head_sites, str) else tuple(self.head_sites)
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ValueError(f"`head_sites` must be non-empty module-name suffixes, got {self.head_sites!r}")
        object.__setattr__(self, "head_sites", sites)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "body": self.body.to_dict(), "head": self.head.to_dict(),
                "head_sites": list(self.head_sites)}

    @property
    def projectable(self) -> bool:
        return self.body.projectable and self.head.projectable

    def for_site(self, name: str) -> AdapterSpec:
        """The spec of the adapter at site `name`."""
        is_head = any(name == h or name.endswith("." + h) for h in self.head_sites)
        return self.head if is_head else self.body


def _build_with_head(spec: WithHead, site: Site):
    # the adapter built is the plain kind's own module (its `.spec` the plain spec), so merging,
    # dropout and export see an ordinary lowrank/linear/... adapter
    return build_adapter(spec.for_site(site.name), site)


register_adapter(WithHead, _build_with_head)
