"""The messages between the scheduler (server side) and a worker, as typed dataclasses.

Transports only move these: in-process they are handed over as objects, over gRPC `serde`
turns them into the protobuf frames of proto/colaflow/v1/worker.proto, in a Ray actor the same.

    server -> worker   Assign, Packets, Ack, Revoke
    worker -> server   Hello (on every connect), Update (colaflow.learn.messages), Refusal
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..job import JobSpec
from ..learn.messages import LearnerState, Packet, Update
from ..sites import Site


@dataclass
class Progress:
    """How far a worker got with one (job, site): its newest version and the last step folded in."""

    job: str
    site: str
    version: int
    fitted_through: int


@dataclass
class Hello:
    """First message of every connection: the worker's progress on each site it holds."""

    progress: list[Progress] = field(default_factory=list)


@dataclass
class SiteStart:
    """One site handed to a worker: where to start (None: a fresh adapter at version 0)."""

    site: Site
    state: LearnerState | None = None


@dataclass
class Assign:
    job: str
    spec: JobSpec
    sites: list[SiteStart]


@dataclass
class Packets:
    """One job's step for one worker; sites that read the same input share its tensor."""

    job: str
    step: int
    packets: list[Packet]


@dataclass
class Ack:
    """The server holds (durably, where it has a state dir) every version of the site up to this one."""

    job: str
    site: str
    version: int


@dataclass
class Revoke:
    job: str
    sites: list[str]
    reason: str


@dataclass
class Refusal:
    """A worker could not use a packet (bad shape, NaN, a gap in the steps): the job fails, loudly."""

    job: str
    site: str
    step: int
    reason: str


ToWorker = Assign | Packets | Ack | Revoke
ToServer = Update | Refusal

__all__ = ["Ack", "Assign", "Hello", "Packets", "Progress", "Refusal", "Revoke", "SiteStart", "ToServer",
           "ToWorker", "Update"]
