"""Proto <-> Python for everything on the wire, in to_proto / from_proto pairs; framing; chunking.

Tensors go through `codec` (the only place they become bytes); maps go through msgpack. Every
`from_proto` checks what it reads and raises ValueError naming the field.

Packets and updates travel as a header (the frame, tensors in payload mode) plus a raw payload,
cut into chunks of at most 4 MiB. A Work message on the wire is
`uint32 LE envelope length | envelope (protobuf) | raw payload bytes` (see worker.proto).
"""
from __future__ import annotations

import os
import struct
from typing import Iterator

import msgpack
import torch

from . import codec
from .gl import Packet, Update
from .v1 import tensor_pb2, worker_pb2

MAX_CHUNK_BYTES = 4 << 20  # at most 4 MiB of payload per message
# smaller chunks may be asked for (tests cut connections mid-frame with them)
CHUNK_BYTES = max(1024, min(MAX_CHUNK_BYTES, int(os.environ.get("COLAFLOW_CHUNK_BYTES", MAX_CHUNK_BYTES))))
MAX_FRAME_BYTES = 1 << 30
MAX_ENVELOPE_BYTES = 16 << 20
_CODEC_PB = {"raw": tensor_pb2.CODEC_RAW, "bf16": tensor_pb2.CODEC_BF16, "fp16": tensor_pb2.CODEC_FP16,
             "int8": tensor_pb2.CODEC_INT8}
_PB_CODEC = {v: k for k, v in _CODEC_PB.items()}
_LEN = struct.Struct("<I")
ALIGN = 64  # payload and every tensor in it start at a multiple of this: aligned, zero-copy tensors


def _pad(n: int) -> int:
    return -n % ALIGN

Parts = list  # buffers (bytes, memoryview, numpy uint8) whose concatenation is a frame's payload


# tensors

def tensor_to_proto(t: torch.Tensor, codec_name: str = "raw", parts: Parts | None = None) -> tensor_pb2.Tensor:
    """A Tensor message; with `parts`, its bytes are appended there (payload mode), else inline."""
    e = codec.encode(t, codec_name)
    m = tensor_pb2.Tensor(dtype=e.dtype, shape=e.shape, codec=_CODEC_PB[e.codec], block=e.block)
    if parts is None:
        m.inline, m.data, m.scales = True, bytes(e.data), bytes(e.scales)
    else:
        m.data_bytes, m.scale_bytes = len(e.data), len(e.scales)
        parts.append(e.data)
        if len(e.scales):
            parts.append(e.scales)
    return m


class _Payload:
    """Reads tensors' bytes in order from a frame's payload, held as the chunks' own buffers.

    A tensor that lies inside one chunk is returned as a view of it (no copy); one that spans
    chunks (only tensors over the chunk size) is gathered into a new buffer.
    """

    def __init__(self, payload=None):
        if payload is None:
            payload = []
        self.views = [memoryview(p).cast("B") for p in (payload if isinstance(payload, list) else [payload])]
        self.i, self.at = 0, 0

    def take(self, n: int, what: str) -> memoryview:
        while self.i < len(self.views) and self.at == len(self.views[self.i]) and n:
            self.i, self.at = self.i + 1, 0
        if self.i < len(self.views) and self.at + n <= len(self.views[self.i]):
            out = self.views[self.i][self.at:self.at + n]
            self.at = min(len(self.views[self.i]), self.at + n + _pad(self.at + n))
            return out
        out, filled = bytearray(n), 0
        while filled < n:
            if self.i >= len(self.views):
                raise ValueError(f"{what}: needs {n} payload bytes, only {filled} left")
            v = self.views[self.i]
            take = min(n - filled, len(v) - self.at)
            out[filled:filled + take] = v[self.at:self.at + take]
            filled, self.at = filled + take, self.at + take
            if self.at == len(v):
                self.i, self.at = self.i + 1, 0
        if self.i < len(self.views):
            self.at = min(len(self.views[self.i]), self.at + _pad(self.at))
        return memoryview(out)

    def done(self) -> None:
        left = sum(len(v) for v in self.views[self.i:]) - self.at
        if left:
            raise ValueError(f"payload has {left} bytes that no tensor claims")


def tensor_from_proto(m: tensor_pb2.Tensor, payload: _Payload | None = None) -> torch.Tensor:
    if m.codec not in _PB_CODEC:
        raise ValueError(f"tensor `codec` {m.codec} is unknown")
    if m.inline:
        data, scales = m.data, m.scales
    else:
        if payload is None:
            raise ValueError("tensor is in payload mode but the message carries no payload")
        data, scales = payload.take(m.data_bytes, "tensor `data_bytes`"), payload.take(m.scale_bytes, "tensor `scale_bytes`")
    return codec.decode(codec.Encoded(m.dtype, tuple(m.shape), _PB_CODEC[m.codec], data, scales, m.block))


# packets: one job's step for one worker; inputs shared by several sites travel once

def packets_to_proto(packets: list[Packet], codec_x: str = "raw", codec_g: str = "raw") -> tuple[worker_pb2.PacketFrame, Parts]:
    job, step = packets[0].job, packets[0].step
    frame, parts = worker_pb2.PacketFrame(job=job, step=step), []
    index: dict[int, int] = {}
    for p in packets:
        if (p.job, p.step) != (job, step):
            raise ValueError("one PacketFrame carries one job's step")
        if id(p.x) not in index:
            index[id(p.x)] = len(frame.inputs)
            frame.inputs.append(tensor_to_proto(p.x, codec_x, parts))
    for p in packets:
        frame.sites.append(worker_pb2.SiteGrad(site=p.site, version=p.version, input=index[id(p.x)],
                                               g=tensor_to_proto(p.g, codec_g, parts)))
    return frame, parts


def packets_from_proto(frame: worker_pb2.PacketFrame, payload=None) -> list[Packet]:
    buf = _Payload(payload)
    inputs = [tensor_from_proto(t, buf) for t in frame.inputs]
    out = []
    for s in frame.sites:
        if s.input >= len(inputs):
            raise ValueError(f"site `{s.site}`: `input` index {s.input} out of range ({len(inputs)} inputs)")
        out.append(Packet(frame.job, s.site, frame.step, s.version, inputs[s.input], tensor_from_proto(s.g, buf)))
    buf.done()
    return out


# updates: full parameters, versioned

def update_to_proto(u: Update, fitted_through: int) -> tuple[worker_pb2.UpdateFrame, Parts]:
    frame, parts = worker_pb2.UpdateFrame(job=u.job, site=u.site, version=u.version,
                                          fitted_through=fitted_through, loss=u.loss), []
    for k in sorted(u.params):
        frame.params[k].CopyFrom(tensor_to_proto(u.params[k], "raw", parts))
    return frame, parts


def update_from_proto(m: worker_pb2.UpdateFrame, payload=None) -> tuple[Update, int]:
    buf = _Payload(payload)
    params = {k: tensor_from_proto(m.params[k], buf) for k in sorted(m.params)}
    buf.done()
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


# framing of Work messages: envelope + raw payload

def frame_message(envelope, payload: Parts = ()) -> bytes:
    """`uint32 LE len | envelope | zero pad to 64 | payload`, as one bytes object (one copy)."""
    env = envelope.SerializeToString()
    return b"".join([_LEN.pack(len(env)), env, bytes(_pad(4 + len(env))), *payload])


def parse_message(data: bytes, cls):
    """(envelope, payload memoryview) from a framed message; raises ValueError on bad framing."""
    if len(data) < 4:
        raise ValueError(f"message of {len(data)} bytes is shorter than its length prefix")
    (n,) = _LEN.unpack_from(data)
    if n > len(data) - 4 or n > MAX_ENVELOPE_BYTES:
        raise ValueError(f"envelope length {n} exceeds the message ({len(data)} bytes)")
    view = memoryview(data)
    try:
        envelope = cls.FromString(view[4:4 + n])
    except Exception as e:
        raise ValueError(f"envelope is not a valid {cls.__name__}: {e}") from None
    return envelope, view[min(len(data), 4 + n + _pad(4 + n)):]


def to_chunks(header, parts: Parts, seq: int, wrap, size: int | None = None) -> Iterator[bytes]:
    """Framed messages carrying `header` and its payload in chunks of <= `size` bytes.

    Parts are packed whole into chunks when they fit, so the receiver decodes them without a
    copy; a part larger than a chunk is split. `wrap(chunk)` builds the envelope around a Chunk.
    """
    size = (size or CHUNK_BYTES) // ALIGN * ALIGN
    views = [memoryview(p).cast("B") for p in parts]
    chunks: list[list] = [[]]
    room = size
    for v in views:
        if len(v) > room and chunks[-1]:
            chunks.append([])
            room = size
        while len(v) > room:  # larger than a whole chunk: split it
            chunks[-1].append(v[:room])
            v = v[room:]
            chunks.append([])
            room = size
        if len(v):
            pad = min(_pad(len(v)), room - len(v))  # the next part starts aligned (or in a new chunk)
            chunks[-1] += [v, bytes(pad)] if pad else [v]
            room -= len(v) + pad
    total = sum(len(p) for c in chunks for p in c)
    for i, pieces in enumerate(chunks):
        chunk = worker_pb2.Chunk(seq=seq, index=i, count=len(chunks))
        if i == 0:
            chunk.header, chunk.payload_bytes = header.SerializeToString(), total
        yield frame_message(wrap(chunk), pieces)


class Reassembler:
    """Collects one frame's chunks; returns (header, [chunk payloads]) when the frame is whole."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES):
        self.max_bytes = max_bytes
        self.seq: int | None = None
        self.parts: list | None = None
        self.header = b""
        self.count = self.expect = self.filled = 0

    def feed(self, c: worker_pb2.Chunk, data) -> tuple[bytes, list] | None:
        if c.count == 0 or c.index >= c.count:
            raise ValueError(f"chunk `index` {c.index} / `count` {c.count} is invalid")
        if len(data) > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
        if c.index == 0:
            if c.payload_bytes > self.max_bytes:
                raise ValueError(f"frame of {c.payload_bytes} bytes exceeds {self.max_bytes}")
            if c.payload_bytes > c.count * MAX_CHUNK_BYTES:
                raise ValueError(f"`payload_bytes` {c.payload_bytes} cannot fit in {c.count} chunks")
            self.seq, self.count, self.filled, self.expect = c.seq, c.count, 0, c.payload_bytes
            self.header, self.parts = c.header, []
        if self.parts is None or c.seq != self.seq or c.index != len(self.parts) or c.count != self.count:
            raise ValueError(f"chunk seq {c.seq} index {c.index}/{c.count} arrived out of order "
                             f"(expected seq {self.seq} index {len(self.parts or [])}/{self.count})")
        self.filled += len(data)
        if self.filled > self.expect:
            raise ValueError(f"chunks carry more than the {self.expect} payload bytes announced")
        self.parts.append(data)
        if len(self.parts) < self.count:
            return None
        if self.filled != self.expect:
            raise ValueError(f"frame ended with {self.filled} of {self.expect} payload bytes")
        header, parts = self.header, self.parts
        self.parts = None
        return header, parts
