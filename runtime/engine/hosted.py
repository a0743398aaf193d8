"""What the host keeps of each job, what a step returns, and what one forward's site hooks share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..adapters.base import Adapter
from ..job import JobSpec
from ..learn.messages import Packet
from ..sites import Site

if TYPE_CHECKING:
    from .memory import Fit
    from .packets import PacketStream


@dataclass
class HostedJob:
    spec: JobSpec
    sites: dict[str, Site]
    adapters: dict[str, Adapter]  # the server's copies: parameters only, never a gradient
    versions: dict[str, int]  # the version each copy holds (the scheduler says which one a step needs)
    merged: dict[str, tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    fit: Fit | None = None  # what memory its steps and packets were admitted with (None: not sized)


@dataclass
class StepResult:
    losses: dict[str, float]  # each job's mean loss over its own tokens
    packets: list[Packet]  # empty when they went to `emit` during the backward
    tokens: dict[str, int]


@dataclass
class Captured:
    """The tensors one forward keeps for its backward and its packets. Dropped whole when the step
    ends: autograd holds the site hooks, and through them this, where Python's collector cannot see."""

    leaves: list[torch.Tensor] = field(default_factory=list)  # where the backward starts from
    group: dict[tuple[str, str], int] = field(default_factory=dict)  # (job, site) -> the input it reads
    inputs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (job, input) -> x, until sent
    forms: dict[tuple[str, int], tuple] = field(default_factory=dict)  # (job, input) -> (shape, dtype, device)
    routes: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> (B, T) token types
    selected: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> (B, T) bool
    seen: dict[int, tuple] = field(default_factory=dict)  # id(x) -> (weak reference to x, its input number)
    numbered: int = 0  # inputs numbered so far
    sent: set[tuple[str, int]] = field(default_factory=set)  # (job, input) whose packets have left


@dataclass
class StepContext:
    """What the site hooks need during one forward; lives only inside `Host.step` / `Host.using`."""

    rows: dict[str, torch.Tensor | None]  # job -> row indices (None: the job has every row)
    order: list[str]
    merged: set[str]  # sites whose weights already carry the single job's delta
    capture: bool  # a training step (inputs kept, gradients wanted), not inference
    steps: dict[str, int] = field(default_factory=dict)  # each job's step number, on its packets
    runs: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, job): rows of one job
    # sites the forward ran: (shape, dtype, device) of each output
    shapes: dict[str, tuple] = field(default_factory=dict)
    stream: PacketStream | None = None
    gate: Callable[[str], None] | None = None
    mask: torch.Tensor | None = None  # the batch's attention mask (conditional kinds choose among real tokens)
    grid: tuple[int, int] | None = None  # the batch's (rows, tokens)
    checkpointing: bool = False  # blocks recompute in the backward: x is kept then, not in the forward
    recomputed: set[str] = field(default_factory=set)  # sites inside those blocks (the others keep x in the forward)
    recomputing: bool = False  # a checkpointed block runs again (the backward needs its activations)
    captured: Captured = field(default_factory=Captured)
