"""Codecs round-trip within their stated bounds; frames are chunked at 4 MiB; bad frames are refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colaflow import Packet, serde
from colaflow.codec import CODECS, Encoded, decode, encode
from colaflow.v1 import worker_pb2

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
def test_raw_is_lossless_for_every_dtype(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    e = encode(t, "raw")
    assert len(e.data) == t.numel() * t.element_size()
    assert torch.equal(decode(e), t) and decode(e).dtype == dtype


def test_raw_decode_does_not_copy():
    e = encode(torch.randn(64, 32), "raw")
    t = decode(e)
    # the decoded tensor is a view of the received bytes: its storage is the frame's own memory
    assert t.untyped_storage().nbytes() == len(e.data)


@pytest.mark.parametrize("codec,bytes_per_elem,elem_bound", [
    ("bf16", 2, lambda x, m: x.abs() * 2**-8), ("fp16", 2, lambda x, m: x.abs() * 2**-11 + 6e-8),
    ("int8", 1.0625, lambda x, m: m / 254 + 1e-7)])
def test_lossy_codecs_hold_their_bounds(codec, bytes_per_elem, elem_bound):
    torch.manual_seed(0)
    x = torch.randn(1000, 77) * torch.logspace(-3, 2, 77)  # columns over five orders of magnitude
    e = encode(x, codec)
    y = decode(e)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert e.nbytes / x.numel() <= bytes_per_elem + 1e-3  # + the last partial block
    block_absmax = torch.nn.functional.pad(x.reshape(-1).abs(), (0, (-x.numel()) % 64)).view(-1, 64).amax(1)
    m = block_absmax.repeat_interleave(64)[: x.numel()].view_as(x)
    assert ((y - x).abs() <= elem_bound(x, m)).all()
    g = torch.randn(1024, 576)  # a gradient-like tensor: relative error well under 1%
    assert float((decode(encode(g, codec)) - g).norm() / g.norm()) < 0.01


def test_fp16_refuses_overflow_and_integers_travel_raw():
    with pytest.raises(ValueError, match="overflows fp16"):
        encode(torch.tensor([1e6]), "fp16")
    ids = torch.arange(10)
    assert encode(ids, "int8").codec == "raw" and torch.equal(decode(encode(ids, "int8")), ids)


@pytest.mark.parametrize("bad,match", [
    (Encoded("float32", (2, 3), "raw", b"\0" * 20), "`data` has 20 bytes"),
    (Encoded("object", (2,), "raw", b"\0" * 8), "`dtype` 'object' is not allowed"),
    (Encoded("float32", (-1, 3), "raw", b""), "negative dimension"),
    (Encoded("float32", (2,), "zip", b"\0" * 8), "`codec` 'zip' is unknown"),
    (Encoded("float32", (100,), "int8", b"\0" * 100, b"\0" * 4, 64), "scale bytes"),
    (Encoded("int64", (2,), "bf16", b"\0" * 4), "applies to floating tensors"),
])
def test_bad_frames_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        decode(bad)


def test_packet_frame_sends_shared_input_once_and_round_trips():
    x = torch.randn(40, 16)
    packets = [Packet("j", "q", 3, 1, x, torch.randn(40, 16)), Packet("j", "v", 3, 1, x, torch.randn(40, 8))]
    frame = serde.packets_to_proto(packets)
    assert len(frame.inputs) == 1
    back = serde.packets_from_proto(worker_pb2.PacketFrame.FromString(frame.SerializeToString()))
    for a, b in zip(packets, back):
        assert (a.job, a.site, a.step, a.version) == (b.job, b.site, b.step, b.version)
        assert torch.equal(a.x, b.x) and torch.equal(a.g, b.g)
    dedup = serde.packets_to_proto(packets).ByteSize()
    separate = sum(serde.packets_to_proto([p]).ByteSize() for p in packets)
    assert dedup < separate - x.numel() * 4 * 0.9


def test_large_frames_are_chunked_and_reassembled():
    frame = serde.packets_to_proto([Packet("j", "s", 0, 0, torch.randn(3000, 576), torch.randn(3000, 576))])
    chunks = serde.to_chunks(frame, seq=7)
    assert len(chunks) == 4 and all(len(c.data) <= serde.CHUNK_BYTES for c in chunks)
    r = serde.Reassembler()
    outs = [r.feed(c) for c in chunks]
    assert outs[:-1] == [None] * 3 and outs[-1] == frame.SerializeToString()
    r = serde.Reassembler()
    r.feed(chunks[0])
    with pytest.raises(ValueError, match="out of order"):
        r.feed(chunks[2])
    with pytest.raises(ValueError, match="exceeds"):
        small = serde.Reassembler(max_bytes=5 << 20)
        for c in chunks:
            small.feed(c)


def test_msgpack_maps_refuse_garbage():
    assert serde.unpack(serde.pack({"a": [1, 2.5, "x", b"y"]})) == {"a": [1, 2.5, "x", b"y"]}
    with pytest.raises(ValueError, match="`spec` is not valid msgpack"):
        serde.unpack(b"\xc1\xc1", "spec")


def test_generated_code_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
