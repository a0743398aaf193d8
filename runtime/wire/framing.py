"""Framing of Work messages: `uint32 LE len | protobuf envelope | zero pad to 64 | raw payload`.

Large frames (packets, updates, assignments) are cut into chunks of at most 4 MiB; every tensor
in a payload starts at a multiple of 64 bytes, so the receiver decodes it as an aligned view of
the received message (no copy). `serde` builds the envelopes; this module only frames bytes.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from ..v1 import worker_pb2

MAX_CHUNK_BYTES = 4 << 20  # at most 4 MiB of payload per message
# smaller chunks may be asked for (tests cut connections mid-frame with them)
CHUNK_BYTES = max(1024, min(MAX_CHUNK_BYTES, int(os.environ.get("COLAFLOW_CHUNK_BYTES", MAX_CHUNK_BYTES))))
MAX_FRAME_BYTES = 1 << 30
MAX_ENVELOPE_BYTES = 4 << 20  # a frame header (tensor metadata, specs) is small: bulk data is payload
MAX_CHUNK_ENVELOPE = 256  # a chunk after the first carries only seq, index and count
_LEN = struct.Struct("<I")
ALIGN = 64  # payload and every tensor in it start at a multiple of this: aligned, zero-copy tensors

Parts = list  # buffers (bytes, memoryview, numpy uint8) or `Later`s, whose concatenation is a frame's payload


def pad(n: int) -> int:
    return -n % ALIGN


class Later:
    """A payload part of known size whose bytes are made when the chunk holding it is framed: a
    frame's header and first chunk leave while its later tensors are still being encoded."""

    def __init__(self, nbytes: int, make):
        self.nbytes, self._make, self._view = nbytes, make, None

    def __len__(self) -> int:
        return self.nbytes

    def view(self) -> memoryview:
        if self._view is None:
            v = memoryview(self._make()).cast("B")
            if len(v) != self.nbytes:  # the header already announced nbytes
                raise RuntimeError(f"a payload part made {len(v)} bytes where {self.nbytes} were announced")
            self._view, self._make = v, None
        return self._view


class Payload:
    """Reads tensors' bytes in order from a frame's payload, held as the chunks' own buffers.

    A tensor that lies inside one chunk is returned as a view of it (no copy); one that spans
    chunks (only tensors over the chunk size) is gathered into a new buffer.
    """

    def __init__(self, payload=None):
        if payload is None:
            payload = []
        self.views = [memoryview(_view(p)).cast("B") for p in (payload if isinstance(payload, list) else [payload])]
        self.i, self.at = 0, 0

    def take(self, n: int, what: str) -> memoryview:
        while self.i < len(self.views) and self.at == len(self.views[self.i]) and n:
            self.i, self.at = self.i + 1, 0
        if self.i < len(self.views) and self.at + n <= len(self.views[self.i]):
            out = self.views[self.i][self.at:self.at + n]
            self.at = min(len(self.views[self.i]), self.at + n + pad(self.at + n))
            return out
        left = sum(len(v) for v in self.views[self.i:]) - self.at
        if n > left:  # before allocating: a header may declare far more than arrived
            raise ValueError(f"{what}: needs {n} payload bytes, only {left} left")
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
            self.at = min(len(self.views[self.i]), self.at + pad(self.at))
        return memoryview(out)

    def done(self) -> None:
        left = sum(len(v) for v in self.views[self.i:]) - self.at
        if left:
            raise ValueError(f"payload has {left} bytes that no tensor claims")


def frame_message(envelope, payload: Parts = ()) -> bytes:
    """`uint32 LE len | envelope | zero pad to 64 | payload`, as one bytes object (one copy)."""
    env = envelope.SerializeToString()
    return b"".join([_LEN.pack(len(env)), env, bytes(pad(4 + len(env))), *payload])


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
    return envelope, view[min(len(data), 4 + n + pad(4 + n)):]


def to_chunks(header, parts: Parts, seq: int, wrap, size: int | None = None) -> Iterator[bytes]:
    """Framed messages carrying `header` and its payload in chunks of <= `size` bytes.

    Parts are packed whole into chunks when they fit, so the receiver decodes them without a
    copy; a part larger than a chunk is split. The layout needs only sizes, so a `Later` part is
    made when its chunk is framed. `wrap(chunk)` builds the envelope around a Chunk.
    """
    size = (size or CHUNK_BYTES) // ALIGN * ALIGN
    if size <= 0:  # a chunk must hold at least one aligned block, or the layout never ends
        raise ValueError(f"chunk size must be at least {ALIGN} bytes")
    parts = [p if isinstance(p, Later) else memoryview(p).cast("B") for p in parts]
    chunks: list[list] = [[]]  # per chunk: (part, start, stop) slices and zero gaps (ints)
    room = size
    for k, p in enumerate(parts):
        at, n = 0, len(p)
        if n > room and chunks[-1]:
            chunks.append([])
            room = size
        while n - at > room:  # larger than a whole chunk: split it
            chunks[-1].append((k, at, at + room))
            at += room
            chunks.append([])
            room = size
        if n - at:
            gap = min(pad(n - at), room - (n - at))  # the next part starts aligned (or in a new chunk)
            chunks[-1] += [(k, at, n), gap] if gap else [(k, at, n)]
            room -= n - at + gap
    total = sum(p if isinstance(p, int) else p[2] - p[1] for c in chunks for p in c)
    for i, pieces in enumerate(chunks):
        chunk = worker_pb2.Chunk(seq=seq, index=i, count=len(chunks))
        if i == 0:
            chunk.header, chunk.payload_bytes = header.SerializeToString(), total
        yield frame_message(wrap(chunk), [bytes(p) if isinstance(p, int) else _view(parts[p[0]])[p[1]:p[2]]
                                          for p in pieces])


def _view(part) -> memoryview:
    return part.view() if isinstance(part, Later) else part


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
        if c.index > 0 and c.ByteSize() > MAX_CHUNK_ENVELOPE:  # held with its payload until the frame is whole
            raise ValueError(f"chunk {c.index} carries a {c.ByteSize()}-byte envelope; only the first has a header")
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
