"""What goes into a fit and what comes out: packets from the server, updates and learner states back.

    Packet(job, site, step, version, x, g[, route])     server -> the owner of (job, site)
    Update(job, site, version, params, ...)             owner -> server: full parameters, versioned
    LearnerState(version, params, optimizer)            a learner at a fit boundary, beyond its device

Plain dataclasses every part shares: the engine makes packets, a learner consumes them, the
scheduler keeps both, the wire carries them (`colaflow.control.protocol` adds the rest of the
conversation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packet:
    """What the server sends the owner of (job, site) after one step: the site's tokens x and their
    gradients g (a full packet), or the statistics of them its fit needs (a projected packet)."""

    job: str
    site: str
    step: int
    version: int  # adapter version the forward used
    x: torch.Tensor | None  # the adapter's input: (N, in), (N,) token ids, or (B, C, H, W); None: projected
    g: torch.Tensor | None  # dL/dh of the site output: (N, out) or (B, out, H', W'); None: projected
    route: torch.Tensor | None = None  # (N,) uint8 token types, for routing kinds only (AdaLink's token_types)
    stats: dict[str, torch.Tensor] | None = None  # projected: `Adapter.project`'s statistics and `gsq`


@dataclass
class OptimizerState:
    """An optimizer's and its schedule's state, in a form that travels: tensors plus a plain map.

    `tensors` are keyed `"<param name>/<key>"` (AdamW: `A/exp_avg`, `A/exp_avg_sq`, `A/step`);
    `meta` holds the parameter groups, the LR schedule and any non-tensor per-parameter value.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict


@dataclass
class LearnerState:
    """A learner's state at a fit boundary: what another worker needs to continue it exactly."""

    version: int
    params: dict[str, torch.Tensor]
    optimizer: OptimizerState | None = None  # None: parameters only; the loader starts a fresh optimizer


@dataclass
class Update:
    """What the owner sends back: the full new parameters, so applying it twice is harmless."""

    job: str
    site: str
    version: int
    params: dict[str, torch.Tensor]
    loss: float  # 0.5 * ||g||^2 summed over the fitted packets: the GL objective at the fit (black-box: the
    # combined cross-entropy, summed over the fitted packets)
    fitted_through: int = -1  # the last step folded into this version: version * I - 1
    optimizer: OptimizerState | None = None  # the learner's full state rides along every `state_every` fits
    grad_norm: float = 0.0  # L2 norm of the fit's parameter gradient (summed over its I steps, before clipping)
    lr: float = 0.0  # the learning rate the fit's optimizer step used (0: not reported)
