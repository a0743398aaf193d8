"""Proto <-> Python for everything on the wire, in to_proto / from_proto pairs; plus chunking.

Tensors go through `codec` (the only place they become bytes); maps go through msgpack. Every
`from_proto` checks what it reads and raises ValueError naming the field.
"""
from __future__ import annotations

import os

import msgpack
import torch

from . import codec
from .gl import Packet, Update
from .v1 import tensor_pb2, worker_pb2

MAX_CHUNK_BYTES = 4 << 20  # at most 4 MiB of frame per message
# smaller chunks may be asked for (tests cut connections mid-frame with them)
CHUNK_BYTES = max(1024, min(MAX_CHUNK_BYTES, int(os.environ.get("COLAFLOW_CHUNK_BYTES", MAX_CHUNK_BYTES))))
MAX_FRAME_BYTES = 1 << 30
_CODEC_PB = {"raw": tensor_pb2.CODEC_RAW, "bf16": tensor_pb2.CODEC_BF16, "fp16": tensor_pb2.CODEC_FP16,
             "int8": tensor_pb2.CODEC_INT8}
_PB_CODEC = {v: k for k, v in _CODEC_PB.items()}


# tensors

def tensor_to_proto(t: torch.Tensor, codec_name: str = "raw") -> tensor_pb2.Tensor:
    e = codec.encode(t, codec_name)
    return tensor_pb2.Tensor(dtype=e.dtype, shape=e.shape, codec=_CODEC_PB[e.codec], data=e.data,
                             scales=e.scales, block=e.block)


def tensor_from_proto(m: tensor_pb2.Tensor) -> torch.Tensor:
    if m.codec not in _PB_CODEC:
        raise ValueError(f"tensor `codec` {m.codec} is unknown")
    return codec.decode(codec.Encoded(m.dtype, tuple(m.shape), _PB_CODEC[m.codec], m.data, m.scales, m.block))


# packets: one job's step for one worker; inputs shared by several sites travel once

def packets_to_proto(packets: list[Packet], codec_x: str = "raw", codec_g: str = "raw") -> worker_pb2.PacketFrame:
    job, step = packets[0].job, packets[0].step
    frame = worker_pb2.PacketFrame(job=job, step=step)
    index: dict[int, int] = {}
    for p in packets:
        if (p.job, p.step) != (job, step):
            raise ValueError("one PacketFrame carries one job's step")
        if id(p.x) not in index:
            index[id(p.x)] = len(frame.inputs)
            frame.inputs.append(tensor_to_proto(p.x, codec_x))
        frame.sites.append(worker_pb2.SiteGrad(site=p.site, version=p.version, input=index[id(p.x)],
                                               g=tensor_to_proto(p.g, codec_g)))
    return frame


def packets_from_proto(frame: worker_pb2.PacketFrame) -> list[Packet]:
    inputs = [tensor_from_proto(t) for t in frame.inputs]
    out = []
    for s in frame.sites:
        if s.input >= len(inputs):
            raise ValueError(f"site `{s.site}`: `input` index {s.input} out of range ({len(inputs)} inputs)")
        out.append(Packet(frame.job, s.site, frame.step, s.version, inputs[s.input], tensor_from_proto(s.g)))
    return out


# updates: full parameters, versioned

def update_to_proto(u: Update, fitted_through: int) -> worker_pb2.UpdateFrame:
    return worker_pb2.UpdateFrame(job=u.job, site=u.site, version=u.version, fitted_through=fitted_through,
                                  loss=u.loss, params={k: tensor_to_proto(v) for k, v in u.params.items()})


def update_from_proto(m: worker_pb2.UpdateFrame) -> tuple[Update, int]:
    params = {k: tensor_from_proto(v) for k, v in m.params.items()}
    for k, v in params.items():
        if not v.is_floating_point():
            raise ValueError(f"update of `{m.site}`: parameter `{k}` has dtype {v.dtype}, expected floating")
    return Update(m.job, m.site, m.version, params, m.loss), m.fitted_through


def params_to_proto(params: dict[str, torch.Tensor]) -> dict[str, tensor_pb2.Tensor]:
    return {k: tensor_to_proto(v) for k, v in params.items()}


def params_from_proto(m) -> dict[str, torch.Tensor]:
    return {k: tensor_from_proto(v) for k, v in m.items()}


# maps: msgpack, never pickle

def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, field: str = "map"):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types; all mean the same to the sender
        raise ValueError(f"`{field}` is not valid msgpack: {e}") from None


# chunking: a frame serialised and cut into <= 4 MiB pieces

def to_chunks(frame, seq: int, size: int = CHUNK_BYTES) -> list[worker_pb2.Chunk]:
    data = frame.SerializeToString()
    count = max(1, -(-len(data) // size))
    return [worker_pb2.Chunk(seq=seq, index=i, count=count, data=data[i * size:(i + 1) * size]) for i in range(count)]


class Reassembler:
    """Collects the chunks of one frame at a time; returns the frame's bytes when complete."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES):
        self.max_bytes = max_bytes
        self.seq: int | None = None
        self.parts: list[bytes] = []
        self.count = 0
        self.size = 0

    def feed(self, c: worker_pb2.Chunk) -> bytes | None:
        if c.count == 0 or c.index >= c.count:
            raise ValueError(f"chunk `index` {c.index} / `count` {c.count} is invalid")
        if c.index == 0:
            self.seq, self.parts, self.count, self.size = c.seq, [], c.count, 0
        elif c.seq != self.seq or c.index != len(self.parts) or c.count != self.count:
            raise ValueError(f"chunk seq {c.seq} index {c.index}/{c.count} arrived out of order "
                             f"(expected seq {self.seq} index {len(self.parts)}/{self.count})")
        if len(c.data) > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk of {len(c.data)} bytes exceeds {MAX_CHUNK_BYTES}")
        self.size += len(c.data)
        if self.size > self.max_bytes:
            raise ValueError(f"frame exceeds {self.max_bytes} bytes")
        self.parts.append(c.data)
        if len(self.parts) < self.count:
            return None
        data = self.parts[0] if self.count == 1 else b"".join(self.parts)
        self.parts = []
        return data
