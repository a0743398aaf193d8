"""The job spec: one tenant's fine-tuning run, as the server and its workers agree on it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .adapters.base import AdapterSpec
from .adapters.lowrank import LowRank
from .learn.optim import AdamW, OptimizerSpec
from .wire.codec import CODECS

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_STEPS = 1 << 40
PACKETS = ("full", "projected")


def check_steps(steps) -> int:
    """A job's step count, checked once for every way in (Session, the server, the scheduler)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"`steps` must be an int in [1, {MAX_STEPS}], got {steps!r}")
    return steps


@dataclass(frozen=True)
class JobSpec:
    """What a job trains and how: adapter, optimizer, sites, fit interval `I`, staleness bound `S`."""

    job_id: str
    adapter: AdapterSpec = field(default_factory=LowRank)
    optimizer: OptimizerSpec = field(default_factory=AdamW)
    target_modules: list[str] | str | None = None  # None: the model family's defaults
    fit_interval: int = 1  # I: fit once on the sum of I steps' gradients
    staleness: int = 0  # S: steps a forward may run ahead of the newest adapter; 0 is exact
    # Fold linear adapters into the weight (W + dW, out of place) for single-job batches. Off by
    # default: for small ranks the unmerged delta costs less than a cached W + dW per site.
    merge: bool = False
    seed: int = 0  # adapter initialisation, so server and device build the same start
    codec_x: str = "raw"  # wire codec of the site inputs x: raw, bf16, fp16, int8, int4
    codec_g: str = "raw"  # wire codec of the gradients g
    # Every `state_every` fits the worker sends its full learner state (optimizer moments included)
    # with the update, and the server keeps the packets since: a device lost for good is replaced
    # exactly. 0: parameters only (a moved site restarts its optimizer; fewer bytes).
    state_every: int = 1
    # "full": packets carry each token's x and g (every adapter kind). "projected" (lowrank, linear; at
    # staleness 0): the fit's sufficient statistics instead, r (in + out) numbers a site and step
    # whatever the tokens (docs/transport.md); the same trajectory, far fewer bytes at scale.
    packets: str = "full"

    def __post_init__(self):
        if not isinstance(self.job_id, str) or not _JOB_ID.fullmatch(self.job_id):
            raise ValueError(f"`job_id` must be 1-64 of [A-Za-z0-9._-], got {self.job_id!r}")
        if not isinstance(self.fit_interval, int) or self.fit_interval < 1:
            raise ValueError(f"`fit_interval` must be an int >= 1, got {self.fit_interval!r}")
        if not isinstance(self.staleness, int) or self.staleness < 0:
            raise ValueError(f"`staleness` must be an int >= 0, got {self.staleness!r}")
        if not isinstance(self.state_every, int) or self.state_every < 0:
            raise ValueError(f"`state_every` must be an int >= 0, got {self.state_every!r}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"`merge` must be true or false, got {self.merge!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")
        for name in ("codec_x", "codec_g"):
            if getattr(self, name) not in CODECS:
                raise ValueError(f"`{name}` must be one of {CODECS}, got {getattr(self, name)!r}")
        if isinstance(self.adapter, dict):
            object.__setattr__(self, "adapter", AdapterSpec.from_dict(self.adapter))
        if self.packets not in PACKETS:
            raise ValueError(f"`packets` must be one of {PACKETS}, got {self.packets!r}")
        if self.packets == "projected":
            if self.staleness:  # the statistics are of the version the forward used: the device must hold it
                raise ValueError(f"`packets='projected'` is exact only at staleness 0 (the device must fit the "
                                 f"version the forward used), got staleness {self.staleness}: use staleness=0, "
                                 "or packets='full'")
            if not self.adapter.projectable:
                raise ValueError(f"`packets='projected'` needs a lowrank or linear adapter (its fit depends on a "
                                 f"step's x and g through fixed statistics); a {self.adapter.kind} adapter takes "
                                 "packets='full'")
        if isinstance(self.optimizer, dict):
            object.__setattr__(self, "optimizer", OptimizerSpec.from_dict(self.optimizer))

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "adapter": self.adapter.to_dict(),
                "optimizer": self.optimizer.to_dict(), "target_modules": self.target_modules,
                "fit_interval": self.fit_interval, "staleness": self.staleness,
                "merge": self.merge, "seed": self.seed, "codec_x": self.codec_x, "codec_g": self.codec_g,
                "state_every": self.state_every, **({"packets": self.packets} if self.packets != "full" else {})}

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a job spec must be a map, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"unknown job spec fields {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)
