"""Proto <-> Python for everything on the wire, in to_proto / from_proto pairs, and the Work stream's
typed messages (colaflow.control.protocol) to and from framed bytes.

Tensors go through `codec` (the only place they become bytes); maps go through msgpack, never
pickle. Every `from_proto` checks what it reads and raises ValueError naming the field. Packets,
updates and assignments travel as a header (the frame, tensors in payload mode) plus a raw
payload cut into chunks (`framing`).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..control.protocol import Ack, Assign, Hello, Packets, Progress, Refusal, Revoke, SiteStart, ToServer, ToWorker
from ..job import JobSpec
from ..learn.messages import LearnerState, OptimizerState, Packet, Update
from ..maps import pack, unpack
from ..sites import Site
from ..v1 import tensor_pb2, worker_pb2
from . import codec
from .framing import (
    CHUNK_BYTES,
    MAX_FRAME_BYTES,
    Later,
    Parts,
    Payload,
    Reassembler,
    frame_message,
    parse_message,
    to_chunks,
)

__all__ = ["CHUNK_BYTES", "Credit", "Goodbye", "Heartbeat", "Inbox", "Opening", "pack", "unpack", "to_worker",
           "to_server", "opening", "credit", "goodbye", "heartbeat_to_worker", "heartbeat_to_server"]

_CODEC_PB = {"raw": tensor_pb2.CODEC_RAW, "bf16": tensor_pb2.CODEC_BF16, "fp16": tensor_pb2.CODEC_FP16,
             "int8": tensor_pb2.CODEC_INT8, "int4": tensor_pb2.CODEC_INT4}
_PB_CODEC = {v: k for k, v in _CODEC_PB.items()}


# tensors

def tensor_to_proto(t: torch.Tensor, codec_name: str = "raw", parts: Parts | None = None,
                    salt: bytes = b"") -> tensor_pb2.Tensor:
    """A Tensor message; with `parts`, its bytes are appended there (payload mode), else inline.
    In payload mode a lossy codec encodes `Later`, when the chunk holding the bytes is framed."""
    if parts is None:
        e = codec.encode(t, codec_name, salt)
        return tensor_pb2.Tensor(dtype=e.dtype, shape=e.shape, codec=_CODEC_PB[e.codec], block=e.block,
                                 inline=True, data=bytes(e.data), scales=bytes(e.scales))
    name = codec.travels_as(t, codec_name)
    n_data, n_scales, block = codec.layout(t, name)
    if name == "raw":  # a view of the tensor's bytes: nothing to defer
        data, scales = codec.encode_as(t, name).data, b""
    else:
        encoded = functools.cache(lambda: codec.encode_as(t, name, salt))
        data, scales = Later(n_data, lambda: encoded().data), Later(n_scales, lambda: encoded().scales)
    m = tensor_pb2.Tensor(dtype=codec.dtype_name(t.dtype), shape=t.shape, codec=_CODEC_PB[name], block=block,
                          data_bytes=n_data, scale_bytes=n_scales)
    parts.append(data)
    if n_scales:
        parts.append(scales)
    return m


def tensor_from_proto(m: tensor_pb2.Tensor, payload: Payload | None = None) -> torch.Tensor:
    if m.codec not in _PB_CODEC:
        raise ValueError(f"tensor `codec` {m.codec} is unknown")
    if m.inline:
        data, scales = m.data, m.scales
    else:
        if payload is None:
            raise ValueError("tensor is in payload mode but the message carries no payload")
        data, scales = payload.take(m.data_bytes,
                                    "tensor `data_bytes`"), payload.take(m.scale_bytes, "tensor `scale_bytes`")
    return codec.decode(codec.Encoded(m.dtype, tuple(m.shape), _PB_CODEC[m.codec], data, scales, m.block))


def _tensors_to_proto(tensors: dict[str, torch.Tensor], into, parts: Parts) -> None:
    """A `map<string, Tensor>` in payload mode, by sorted name (the payload order)."""
    for k in sorted(tensors):
        into[k].CopyFrom(tensor_to_proto(tensors[k], "raw", parts))


def _tensors_from_proto(m, buf: Payload, what: str) -> dict[str, torch.Tensor]:
    out = {k: tensor_from_proto(m[k], buf) for k in sorted(m)}
    for k, v in out.items():
        if not v.is_floating_point():
            raise ValueError(f"{what}: tensor `{k}` has dtype {v.dtype}, expected floating")
    return out


def _optimizer_to_proto(o: OptimizerState, into: worker_pb2.OptimizerState, parts: Parts) -> None:
    _tensors_to_proto(o.tensors, into.tensors, parts)
    into.meta = pack(o.meta)


def _optimizer_from_proto(m: worker_pb2.OptimizerState, buf: Payload, what: str) -> OptimizerState:
    tensors = {k: tensor_from_proto(m.tensors[k], buf) for k in sorted(m.tensors)}
    meta = unpack(m.meta, f"{what} optimizer `meta`")
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: optimizer `meta` must be a map")
    return OptimizerState(tensors, meta)


# packets: one job's step for one worker; inputs shared by several sites travel once

def packets_to_proto(msg: Packets, codec_x: str = "raw", codec_g: str = "raw") -> tuple[worker_pb2.PacketFrame, Parts]:
    frame, parts = worker_pb2.PacketFrame(job=msg.job, step=msg.step), []
    index: dict[int, int] = {}
    for p in msg.packets:
        if (p.job, p.step) != (msg.job, msg.step):
            raise ValueError("one PacketFrame carries one job's step")
        if p.stats is None and id(p.x) not in index:
            index[id(p.x)] = len(frame.inputs)
            frame.inputs.append(tensor_to_proto(p.x, codec_x, parts, codec.packet_salt(msg.job, msg.step, "x")))
    for p in msg.packets:
        if p.stats is not None:  # projected: statistics by sorted name, each in the job's gradient codec
            s = worker_pb2.SiteGrad(site=p.site, version=p.version)
            for name in sorted(p.stats):
                salt = codec.packet_salt(msg.job, msg.step, f"{p.site}/{name}")
                s.stats[name].CopyFrom(tensor_to_proto(p.stats[name], codec_g, parts, salt))
            frame.sites.append(s)
            continue
        s = worker_pb2.SiteGrad(site=p.site, version=p.version, input=index[id(p.x)],
                                g=tensor_to_proto(p.g, codec_g, parts, codec.packet_salt(msg.job, msg.step, p.site)))
        if p.route is not None:  # after g in the payload, as packets_from_proto reads it
            s.route.CopyFrom(tensor_to_proto(p.route, "raw", parts))
        frame.sites.append(s)
    return frame, parts


def packets_from_proto(frame: worker_pb2.PacketFrame, payload=None) -> Packets:
    buf = Payload(payload)
    inputs = [tensor_from_proto(t, buf) for t in frame.inputs]
    out = []
    for s in frame.sites:
        if s.stats:
            if s.HasField("g") or s.HasField("route"):
                raise ValueError(f"site `{s.site}`: a packet carries `stats` or `g`, not both")
            stats = {name: tensor_from_proto(s.stats[name], buf) for name in sorted(s.stats)}
            out.append(Packet(frame.job, s.site, frame.step, s.version, None, None, None, stats))
            continue
        if s.input >= len(inputs):
            raise ValueError(f"site `{s.site}`: `input` index {s.input} out of range ({len(inputs)} inputs)")
        g = tensor_from_proto(s.g, buf)
        route = tensor_from_proto(s.route, buf) if s.HasField("route") else None
        out.append(Packet(frame.job, s.site, frame.step, s.version, inputs[s.input], g, route))
    buf.done()
    return Packets(frame.job, frame.step, out)


# updates: full parameters, versioned; every `state_every` fits the optimizer state too

def update_to_proto(u: Update) -> tuple[worker_pb2.UpdateFrame, Parts]:
    frame, parts = worker_pb2.UpdateFrame(job=u.job, site=u.site, version=u.version,
                                          fitted_through=u.fitted_through, loss=u.loss, grad_norm=u.grad_norm,
                                          lr=u.lr), []
    _tensors_to_proto(u.params, frame.params, parts)
    if u.optimizer is not None:
        _optimizer_to_proto(u.optimizer, frame.optimizer, parts)
    return frame, parts


def update_from_proto(m: worker_pb2.UpdateFrame, payload=None) -> Update:
    buf = Payload(payload)
    what = f"update of `{m.site}`"
    params = _tensors_from_proto(m.params, buf, what)
    optimizer = _optimizer_from_proto(m.optimizer, buf, what) if m.HasField("optimizer") else None
    buf.done()
    return Update(m.job, m.site, m.version, params, m.loss, m.fitted_through, optimizer, m.grad_norm, m.lr)


# assignments: where each site starts (fresh, or a learner state the server holds)

def assign_to_proto(a: Assign) -> tuple[worker_pb2.Assignment, Parts]:
    frame, parts = worker_pb2.Assignment(job=a.job, spec=pack(a.spec.to_dict())), []
    for start in a.sites:
        s = frame.sites.add(site=pack(start.site.to_dict()), has_state=start.state is not None)
        if start.state is not None:
            s.version = start.state.version
            _tensors_to_proto(start.state.params, s.params, parts)
            if start.state.optimizer is not None:
                _optimizer_to_proto(start.state.optimizer, s.optimizer, parts)
    return frame, parts


def assign_from_proto(m: worker_pb2.Assignment, payload=None) -> Assign:
    buf = Payload(payload)
    spec = JobSpec.from_dict(unpack(m.spec, "assignment `spec`"))
    starts = []
    for s in m.sites:
        try:
            site = Site.from_dict(unpack(s.site, "assignment `site`"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"assignment `site` is malformed: {e!r}") from None
        state = None
        if s.has_state:
            what = f"start of `{site.name}`"
            params = _tensors_from_proto(s.params, buf, what)
            opt = _optimizer_from_proto(s.optimizer, buf, what) if s.HasField("optimizer") else None
            state = LearnerState(s.version, params, opt)
        starts.append(SiteStart(site, state))
    buf.done()
    return Assign(m.job, spec, starts)


# maps: msgpack, never pickle (colaflow.maps, torch-free for the control client)


# the Work stream: typed messages <-> framed bytes

@dataclass
class Opening:
    """The first message of a worker's Work stream."""

    session: str
    hello: Hello


@dataclass
class Credit:
    packets: int


@dataclass
class Goodbye:
    reason: str
    leaving: bool = False  # for good: the server moves the worker's sites at once


@dataclass
class Heartbeat:
    time: float
    status: str = ""  # from a worker: why it is unhealthy, "" when healthy


def to_worker(msg: ToWorker, seq: int, codec_x: str = "raw", codec_g: str = "raw") -> Iterator[bytes]:
    """Framed ServerMessages for one message to a worker (several for a chunked frame)."""
    env = worker_pb2.ServerMessage
    if isinstance(msg, Packets):
        frame, parts = packets_to_proto(msg, codec_x, codec_g)
        yield from to_chunks(frame, parts, seq, lambda c: env(packet=c))
    elif isinstance(msg, Assign):
        frame, parts = assign_to_proto(msg)
        yield from to_chunks(frame, parts, seq, lambda c: env(assignment=c))
    elif isinstance(msg, Ack):
        yield frame_message(env(ack=worker_pb2.UpdateAck(job=msg.job, site=msg.site, version=msg.version)))
    elif isinstance(msg, Revoke):
        yield frame_message(env(revocation=worker_pb2.Revocation(job=msg.job, sites=msg.sites, reason=msg.reason)))
    else:
        raise TypeError(f"no wire form for {type(msg).__name__}")


def to_server(msg: ToServer, seq: int) -> Iterator[bytes]:
    """Framed WorkerMessages for one message to the server."""
    env = worker_pb2.WorkerMessage
    if isinstance(msg, Update):
        frame, parts = update_to_proto(msg)
        yield from to_chunks(frame, parts, seq, lambda c: env(update=c))
    elif isinstance(msg, Refusal):
        yield frame_message(env(refusal=worker_pb2.Refusal(job=msg.job, site=msg.site, step=msg.step,
                                                           reason=msg.reason[:4096])))
    else:
        raise TypeError(f"no wire form for {type(msg).__name__}")


def opening(session: str, hello: Hello) -> bytes:
    progress = [worker_pb2.SiteProgress(job=p.job, site=p.site, version=p.version, fitted_through=p.fitted_through)
                for p in hello.progress]
    return frame_message(worker_pb2.WorkerMessage(hello=worker_pb2.Hello(session=session, progress=progress)))


def credit(n: int) -> bytes:
    return frame_message(worker_pb2.WorkerMessage(credit=worker_pb2.Credit(packets=n)))


def goodbye(reason: str, leaving: bool = False) -> bytes:
    return frame_message(worker_pb2.WorkerMessage(goodbye=worker_pb2.Goodbye(reason=reason, leaving=leaving)))


def heartbeat_to_server(t: float, status: str = "") -> bytes:
    return frame_message(worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat(time=t, status=status[:1024])))


def heartbeat_to_worker(t: float) -> bytes:
    return frame_message(worker_pb2.ServerMessage(heartbeat=worker_pb2.Heartbeat(time=t)))


_CHUNKED = {"packet": (worker_pb2.PacketFrame, packets_from_proto),
            "assignment": (worker_pb2.Assignment, assign_from_proto),
            "update": (worker_pb2.UpdateFrame, update_from_proto)}


class Inbox:
    """Framed messages in, typed messages out; chunked frames are reassembled (one per kind).

    `Inbox("server")` reads what workers send (Opening, Credit, Update, Refusal, Heartbeat,
    Goodbye); `Inbox("worker")` what the server sends (Assign, Packets, Ack, Revoke, Heartbeat).
    """

    def __init__(self, side: str, max_bytes: int = MAX_FRAME_BYTES):
        self.cls = {"server": worker_pb2.WorkerMessage, "worker": worker_pb2.ServerMessage}[side]
        self.max_bytes = max_bytes
        self.frames: dict[str, Reassembler] = {}

    def feed(self, raw: bytes):
        """The typed message `raw` completes, or None (a chunk of a frame still in flight)."""
        msg, payload = parse_message(raw, self.cls)
        kind = msg.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"{self.cls.__name__} carries no message")
        m = getattr(msg, kind)
        if kind in _CHUNKED:
            if m.index == 0 and m.payload_bytes > self.max_bytes:  # the budget may change between frames
                raise ValueError(f"{kind} frame of {m.payload_bytes} bytes exceeds this stream's {self.max_bytes}")
            whole = self.frames.setdefault(kind, Reassembler()).feed(m, payload)
            if whole is None:
                return None
            cls, decode = _CHUNKED[kind]
            try:
                header = cls.FromString(whole[0])
            except Exception as e:
                raise ValueError(f"{kind} header is not a valid {cls.__name__}: {e}") from None
            return decode(header, whole[1])
        if kind == "hello":
            return Opening(m.session, Hello([Progress(p.job, p.site, p.version, p.fitted_through) for p in m.progress]))
        if kind == "credit":
            return Credit(m.packets)
        if kind == "heartbeat":
            return Heartbeat(m.time, m.status)
        if kind == "goodbye":
            return Goodbye(m.reason, m.leaving)
        if kind == "refusal":
            return Refusal(m.job, m.site, m.step, m.reason)
        if kind == "ack":
            return Ack(m.job, m.site, m.version)
        if kind == "revocation":
            return Revoke(m.job, list(m.sites), m.reason)
        raise ValueError(f"unknown message kind {kind!r}")
