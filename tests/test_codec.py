"""Codecs round-trip within their stated bounds; frames are chunked at 4 MiB; bad frames are refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colaflow import Packet
from colaflow.control.protocol import Packets
from colaflow.v1 import worker_pb2
from colaflow.wire import framing, serde
from colaflow.wire.codec import Encoded, decode, encode, layout, travels_as

ROOT = Path(__file__).resolve().parents[1]


def _frame(packets: list[Packet]) -> Packets:
    return Packets(packets[0].job, packets[0].step, packets)


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


def test_int4_is_unbiased_within_its_bound_and_deterministic():
    """int4: 0.5625 bytes per element, error < absmax(block)/7, stochastic rounding with mean zero
    (nearest rounding would not be), and one tensor always gives the same bytes (replays stay exact)."""
    torch.manual_seed(0)
    x = torch.randn(300, 77) * torch.logspace(-3, 2, 77)
    e = encode(x, "int4")
    assert e.nbytes / x.numel() <= 0.5625 + 1e-3
    m = torch.nn.functional.pad(x.reshape(-1).abs(), (0, (-x.numel()) % 64)).view(-1, 64).amax(1)
    m = m.repeat_interleave(64)[: x.numel()].view_as(x)
    assert ((decode(e) - x).abs() <= m / 7 * (1 + 1e-6)).all()
    assert bytes(encode(x.clone(), "int4").data) == bytes(e.data)
    big, threads = torch.randn(1 << 20), torch.get_num_threads()
    try:  # the same bytes at any thread count: a server and an in-process run may differ in it
        torch.set_num_threads(1)
        one = bytes(encode(big, "int4", b"s").data)
        torch.set_num_threads(2)
        assert bytes(encode(big, "int4", b"s").data) == one
    finally:
        torch.set_num_threads(threads)
    assert bytes(encode(big, "int4", b"t").data) != one  # another salt (job, step, site): other noise
    small = torch.full((64,), 0.1)
    small[0] = 7.0  # one large value per block: the rest round to 0 or 1 x scale, never to nearest
    mean = torch.stack([decode(encode(small, "int4", seed=k)) for k in range(1000)]).mean(0)
    assert float((mean[1:] - 0.1).abs().max()) < 0.05 and float(decode(encode(small, "int4", seed=0))[1:].mean()) != 0
    odd = torch.randn(3, 5)  # an odd count: the last byte holds one element
    assert decode(encode(odd, "int4")).shape == odd.shape
    with pytest.raises(ValueError, match="`data` has 7 bytes"):
        decode(Encoded("float32", (3, 5), "int4", b"\0" * 7, b"\0" * 4, 64))


def test_fp16_out_of_range_travels_as_bf16_and_integers_travel_raw():
    """A tensor beyond fp16's range goes as bf16 (same bytes, float32's range), so one outlier
    activation cannot fail a whole frame; the receiver reads each tensor's own codec."""
    x = torch.tensor([1e6, -3.0, 0.5])
    e = encode(x, "fp16")
    assert e.codec == "bf16" and len(e.data) == 2 * x.numel()
    assert torch.allclose(decode(e), x, rtol=2**-8) and bool(torch.isfinite(decode(e)).all())
    assert encode(torch.tensor([-65504.0, 3.0]), "fp16").codec == "fp16"
    nan = torch.tensor([1e6, float("nan"), 1.0])  # NaN must not hide an out-of-range value
    assert encode(nan, "fp16").codec == "bf16"
    assert bool(torch.isfinite(decode(encode(nan, "fp16"))[[0, 2]]).all())
    assert decode(encode(torch.randn(1, 2)[:, 1], "raw")).shape == (1,)  # a one-element strided view
    frame, parts = serde.packets_to_proto(_frame([Packet("j", "s", 0, 0, x, x[:2].clone())]), "fp16", "fp16")
    header, payload, _ = _send(frame, parts)
    back = serde.packets_from_proto(worker_pb2.PacketFrame.FromString(header), payload).packets[0]
    assert torch.allclose(back.x, x, rtol=2**-8) and torch.allclose(back.g, x[:2], rtol=2**-8)
    ids = torch.arange(10)
    assert encode(ids, "int8").codec == "raw" and torch.equal(decode(encode(ids, "int8")), ids)


@pytest.mark.parametrize("codec", ["raw", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("shape", [(0,), (1,), (63,), (64,), (65,), (3, 5), (128, 64), (7, 3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_layout_is_what_encode_makes(codec, shape, dtype):
    """A frame's header announces each tensor's bytes before the tensor is encoded."""
    t = (torch.randn(shape) * 1e3).to(dtype)
    name = travels_as(t, codec)
    e = encode(t, codec)
    assert e.codec == name and layout(t, name) == (len(e.data), len(e.scales), e.block)


def test_lossy_tensors_are_encoded_as_their_chunk_is_framed_with_the_same_bytes():
    """The first chunk of a packet frame leaves before its last tensors are encoded (the encode
    overlaps the send), and the chunks are byte for byte those of encoding everything first."""
    packets = [Packet("j", f"s{i}", 0, 0, torch.randn(512, 576), torch.randn(512, 576)) for i in range(4)]
    for codec in ("bf16", "int8", "int4"):
        frame, parts = serde.packets_to_proto(_frame(packets), codec, codec)
        later = [p for p in parts if isinstance(p, framing.Later)]
        assert later and all(p._view is None for p in later)  # nothing encoded yet
        chunks = framing.to_chunks(frame, parts, 7, lambda c: worker_pb2.ServerMessage(packet=c), 1 << 20)
        first = next(chunks)
        made = sum(p._view is not None for p in later)
        assert 0 < made < len(later), codec
        msgs = [first, *chunks]
        eager = [bytes(p.view()) if isinstance(p, framing.Later) else p for p in parts]
        assert msgs == list(framing.to_chunks(frame, eager, 7, lambda c: worker_pb2.ServerMessage(packet=c), 1 << 20))


@pytest.mark.parametrize("bad,match", [
    (Encoded("float32", (2, 3), "raw", b"\0" * 20), "`data` has 20 bytes"),
    (Encoded("object", (2,), "raw", b"\0" * 8), "`dtype` 'object' is not allowed"),
    (Encoded("float32", (-1, 3), "raw", b""), "negative dimension"),
    (Encoded("float32", (2,), "zip", b"\0" * 8), "`codec` 'zip' is unknown"),
    (Encoded("float32", (100,), "int8", b"\0" * 100, b"\0" * 4, 64), "scale bytes"),
    (Encoded("int64", (2,), "bf16", b"\0" * 4), "applies to floating tensors"),
    (Encoded("float32", (1,), "int4", b"\0", b"\0" * 4, 1 << 30), "block 1073741824; this codec uses 64"),
    (Encoded("float32", (1,), "int8", b"\0", b"\0" * 4, 1 << 31), "this codec uses 64"),
    (Encoded("float32", (2,), "int8", b"\0" * 2, b"\x00\x00\xc0\x7f", 64), "non-finite block scale"),
])
def test_bad_frames_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        decode(bad)


def _send(frame, parts, size=None):
    """Frame, chunk and reassemble as the Work stream does; returns (header, payload chunks, messages)."""
    msgs = list(framing.to_chunks(frame, parts, 7, lambda c: worker_pb2.ServerMessage(packet=c), size))
    r, whole = framing.Reassembler(), None
    for m in msgs:
        env, payload = framing.parse_message(m, worker_pb2.ServerMessage)
        whole = r.feed(env.packet, payload)
    return whole[0], whole[1], msgs


def test_packet_frame_sends_shared_input_once_and_round_trips():
    x = torch.randn(40, 16)
    packets = [Packet("j", "q", 3, 1, x, torch.randn(40, 16)), Packet("j", "v", 3, 1, x, torch.randn(40, 8))]
    frame, parts = serde.packets_to_proto(_frame(packets))
    assert len(frame.inputs) == 1 and sum(len(p) for p in parts) == (40 * 16 * 2 + 40 * 8) * 4
    header, payload, _ = _send(frame, parts)
    back = serde.packets_from_proto(worker_pb2.PacketFrame.FromString(header), payload).packets
    for a, b in zip(packets, back):
        assert (a.job, a.site, a.step, a.version) == (b.job, b.site, b.step, b.version)
        assert torch.equal(a.x, b.x) and torch.equal(a.g, b.g)
    assert back[0].x is back[1].x  # still shared after the trip


def test_large_frames_are_chunked_and_decoded_without_copies():
    big = [Packet("j", f"s{i}", 0, 0, torch.randn(1024, 576), torch.randn(1024, 576)) for i in range(4)]
    frame, parts = serde.packets_to_proto(_frame(big))  # 8 tensors of 2.25 MiB
    header, payload, msgs = _send(frame, parts)
    assert len(msgs) == 8 and all(len(m) <= framing.MAX_CHUNK_BYTES + 4096 for m in msgs)
    back = serde.packets_from_proto(worker_pb2.PacketFrame.FromString(header), payload).packets
    assert all(torch.equal(a.g, b.g) for a, b in zip(big, back))
    # every tensor is a view of the message it arrived in, not a copy
    import numpy as np
    spans = [(np.frombuffer(p, np.uint8).ctypes.data, len(p)) for p in payload]
    assert all(any(a <= t.data_ptr() < a + n for a, n in spans) for b in back for t in (b.x, b.g))
    huge = [Packet("j", "s", 0, 0, torch.randn(3000, 576), torch.randn(3000, 576))]  # 6.6 MiB tensors
    h, p, msgs = _send(*serde.packets_to_proto(_frame(huge)))
    assert len(msgs) == 4
    assert torch.equal(serde.packets_from_proto(worker_pb2.PacketFrame.FromString(h), p).packets[0].g, huge[0].g)
    with pytest.raises(ValueError, match="at least 64 bytes"):  # rounds down to 0: the layout would never end
        _send(frame, parts, framing.ALIGN - 1)


def test_reassembler_refuses_bad_chunk_sequences():
    frame, parts = serde.packets_to_proto(_frame([Packet("j", "s", 0, 0, torch.randn(3000, 576),
                                                         torch.randn(3000, 576))]))
    msgs = [framing.parse_message(m, worker_pb2.ServerMessage) for m in
            framing.to_chunks(frame, parts, 1, lambda c: worker_pb2.ServerMessage(packet=c))]
    r = framing.Reassembler()
    r.feed(msgs[0][0].packet, msgs[0][1])
    with pytest.raises(ValueError, match="out of order"):
        r.feed(msgs[2][0].packet, msgs[2][1])
    with pytest.raises(ValueError, match="exceeds"):
        framing.Reassembler(max_bytes=5 << 20).feed(msgs[0][0].packet, msgs[0][1])
    with pytest.raises(ValueError, match="exceeds 4194304"):
        framing.Reassembler().feed(worker_pb2.Chunk(seq=1, index=0, count=2, payload_bytes=5 << 20), b"\0" * (5 << 20))
    with pytest.raises(ValueError, match="envelope length"):
        framing.parse_message(b"\xff\xff\x00\x00abc", worker_pb2.ServerMessage)
    small, small_parts = serde.packets_to_proto(_frame([Packet("j", "s", 0, 0, torch.randn(4, 8), torch.randn(4, 8))]))
    with pytest.raises(ValueError, match="needs 128 payload bytes"):  # the payload is short of its tensors
        serde.packets_from_proto(small, [bytes(small_parts[0]), bytes(small_parts[1])[:-8]])
    with pytest.raises(ValueError, match="no tensor claims"):
        serde.packets_from_proto(small, [bytes(small_parts[0]), bytes(small_parts[1]), b"extra"])


def test_msgpack_maps_refuse_garbage():
    assert serde.unpack(serde.pack({"a": [1, 2.5, "x", b"y"]})) == {"a": [1, 2.5, "x", b"y"]}
    with pytest.raises(ValueError, match="`spec` is not valid msgpack"):
        serde.unpack(b"\xc1\xc1", "spec")


def test_generated_code_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
