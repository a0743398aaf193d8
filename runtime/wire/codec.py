"""The only place tensors become bytes and back: raw little-endian, bf16, fp16, int8 and int4 blockwise.

    enc = encode(g, "int8")        # Encoded(dtype="float32", shape=(N, D), codec="int8", data, scales, block)
    g2 = decode(enc)               # float32 again; |g2 - g| <= absmax(block) / 254 elementwise

Error bounds (per element, for values in range): raw exact; bf16 relative 2^-8; fp16 relative
2^-11 (a tensor with any |x| > 65504 travels as bf16 instead); int8 absolute absmax(block)/254;
int4 absolute absmax(block)/7. Integer tensors always travel raw. Each tensor on the wire names
its own codec, so a receiver never has to know which was asked for.

int4 rounds stochastically (up with probability equal to the remainder), so decode(encode(t)) is
unbiased: E[q] = t. An adapter's gradient is linear in g (and in x, for x and g rounded
independently), so the device's gradient stays unbiased too; rounding to nearest would bias it
towards zero wherever |t| is small next to its block's absmax. The noise is seeded from the
tensor's block absmaxes and a salt (serde passes job, step and site): a resend of a step encodes
to the same bytes in any process at any thread count (failover stays exact), while equal inputs
at different steps get fresh noise.
"""
from __future__ import annotations

import math
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch

CODECS = ("raw", "bf16", "fp16", "int8", "int4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "uint8": torch.uint8}  # uint8: token types (a packet's `route`)
INT8_BLOCK = 64  # 1 + 4/64 = 1.0625 bytes per element
INT4_BLOCK = 64  # 0.5 + 4/64 = 0.5625 bytes per element
_BLOCKED = {"int8": (INT8_BLOCK, 127), "int4": (INT4_BLOCK, 7)}
FP16_MAX = 65504.0
MAX_ELEMENTS = 1 << 31
MAX_DIMS = 8

assert sys.byteorder == "little", "colaflow's wire format is little-endian; big-endian hosts are unsupported"


@dataclass(frozen=True)
class Encoded:
    dtype: str  # the logical dtype the receiver gets back
    shape: tuple[int, ...]
    codec: str
    data: object  # a bytes-like buffer: bytes, memoryview, or a uint8 numpy view of the tensor
    scales: object = b""
    block: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scales)


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype {dtype} cannot travel; allowed: {sorted(DTYPES)}")


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's little-endian bytes as a uint8 view: no copy for contiguous CPU tensors."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.stride(0) != 1:  # a one-element view torch calls contiguous, with its parent's stride
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8).numpy()


def travels_as(t: torch.Tensor, codec: str) -> str:
    """The codec `t` travels in when `codec` is asked for: integer tensors go raw, and a tensor
    beyond fp16's range goes bf16 (the same bytes, float32's range) rather than failing a frame."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")
    dtype_name(t.dtype)
    if not t.is_floating_point():
        return "raw"
    if codec == "fp16" and t.numel():
        lo, hi = torch.aminmax(t.detach())  # one pass, no |t| copy
        if not max(-float(lo), float(hi)) <= FP16_MAX:  # NaN compares false: such a tensor goes bf16 too
            return "bf16"
    return codec


def layout(t: torch.Tensor, codec: str) -> tuple[int, int, int]:
    """(data bytes, scale bytes, block) of `encode(t, codec)` for a `codec` from `travels_as`,
    without encoding: a frame's header is written before its tensors are encoded."""
    n = t.numel()
    if codec == "raw":
        return n * t.element_size(), 0, 0
    if codec in ("bf16", "fp16"):
        return 2 * n, 0, 0
    block = _BLOCKED[codec][0]
    return (n if codec == "int8" else (n + 1) // 2), 4 * -(-n // block), block


def encode(t: torch.Tensor, codec: str = "raw", salt: bytes = b"", seed: int | None = None) -> Encoded:
    """Encode a tensor in the codec it travels as (`travels_as`). int4's rounding noise is seeded
    by the tensor's block absmaxes and `salt` (say, job and step: equal inputs of different steps get
    independent noise, a resend of one step the same); or by `seed`."""
    return encode_as(t, travels_as(t, codec), salt, seed)


def encode_as(t: torch.Tensor, codec: str, salt: bytes = b"", seed: int | None = None) -> Encoded:
    """`encode` in a codec `travels_as` already chose for `t` (a frame's header announced it)."""
    dtype = dtype_name(t.dtype)
    if codec == "raw":
        return Encoded(dtype, tuple(t.shape), "raw", _bytes(t))
    if codec in ("bf16", "fp16"):
        return Encoded(dtype, tuple(t.shape), codec, _bytes(t.to(torch.bfloat16 if codec == "bf16" else torch.float16)))
    block, top = _BLOCKED[codec]
    flat = t.detach().float().reshape(-1)
    n = flat.numel()
    blocks = (torch.nn.functional.pad(flat, (0, -n % block)) if n % block else flat).view(-1, block)  # (nb, block)
    scale = blocks.abs().amax(1, keepdim=True) / top  # (nb, 1)
    v = blocks / scale.clamp_min(1e-30)  # a new tensor: the steps below work in place
    if codec == "int8":
        q = v.round_().clamp_(-top, top).to(torch.int8).reshape(-1)[:n]
        return Encoded(dtype, tuple(t.shape), codec, _bytes(q), _bytes(scale), block)
    rng = np.random.Generator(np.random.PCG64(_content_seed(scale, salt) if seed is None else seed))
    # U[0, 1): 2x torch.rand's speed
    u = torch.from_numpy(rng.random(v.numel(), dtype=np.float32)).view_as(v).to(v.device)
    q = v.add_(u).floor_().clamp_(-top, top).add_(8)
    q = q.reshape(-1)[:n].to(torch.uint8)  # nibbles 1..15
    q = torch.nn.functional.pad(q, (0, n % 2))
    return Encoded(dtype, tuple(t.shape), codec, _bytes(q[0::2] | (q[1::2] << 4)), _bytes(scale), block)


def packet_salt(job: str, step: int, role: str) -> bytes:
    """What seeds a packet tensor's codec noise with its values (`role`: "x" or the site's name): the
    same on a resend of the step, independent between steps and sites."""
    return f"{job}\0{step}\0{role}".encode()


def through(t: torch.Tensor, codec: str, salt: bytes = b"") -> torch.Tensor:
    """`t` as it arrives after travelling in `codec`: what a receiver decodes (the in-process
    Trainer delivers lossy packets this way, so they train as they would over gRPC)."""
    return decode(encode(t, codec, salt))


def _content_seed(scale: torch.Tensor, salt: bytes) -> int:
    """A seed from the tensor's block absmaxes and `salt`, the same in every process and at any
    thread count (a max has no rounding order, where a sum would): equal in, equal noise."""
    return zlib.crc32(salt, zlib.crc32(_bytes(scale))) | (len(salt) << 32) | (scale.numel() << 40)


def decode(e: Encoded) -> torch.Tensor:
    """Decode with checks on every field; zero-copy for raw tensors (read-only views of the bytes)."""
    if e.dtype not in DTYPES:
        raise ValueError(f"tensor `dtype` {e.dtype!r} is not allowed; allowed: {sorted(DTYPES)}")
    if e.codec not in CODECS:
        raise ValueError(f"tensor `codec` {e.codec!r} is unknown; known: {CODECS}")
    if len(e.shape) > MAX_DIMS:
        raise ValueError(f"tensor `shape` has {len(e.shape)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in e.shape):
        raise ValueError(f"tensor `shape` {e.shape} has a negative dimension")
    n = math.prod(e.shape)  # Python ints: a product of huge dimensions cannot overflow into a small one
    if n > MAX_ELEMENTS:
        raise ValueError(f"tensor of shape {e.shape} exceeds {MAX_ELEMENTS} elements")
    dtype = DTYPES[e.dtype]
    wire = {"raw": dtype, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
            "int4": torch.uint8}[e.codec]
    if e.codec != "raw" and not dtype.is_floating_point:
        raise ValueError(f"codec {e.codec!r} applies to floating tensors, not {e.dtype}")
    count = (n + 1) // 2 if e.codec == "int4" else n  # int4: two elements per byte
    itemsize = torch.empty(0, dtype=wire).element_size()
    if len(e.data) != count * itemsize:
        raise ValueError(f"tensor `data` has {len(e.data)} bytes; shape {e.shape} in {e.codec} "
                         f"needs {count * itemsize}")
    with warnings.catch_warnings():  # read-only buffers: the receiver never writes into them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(e.data, dtype=wire, count=count) if n else torch.empty(0, dtype=wire)
        if e.codec in _BLOCKED:
            block = _BLOCKED[e.codec][0]
            if e.block != block:  # a huge block would make the padding below a huge allocation
                raise ValueError(f"{e.codec} tensor has block {e.block}; this codec uses {block}")
            nb = -(-n // block)
            if len(e.scales) != 4 * nb:
                raise ValueError(f"{e.codec} tensor has {len(e.scales)} scale bytes for block {block}; needs {4 * nb}")
            scale = torch.frombuffer(e.scales, dtype=torch.float32, count=nb) if nb else torch.empty(0)
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError(f"{e.codec} tensor has a negative or non-finite block scale")
            if e.codec == "int4":
                t = torch.stack([t & 15, t >> 4], 1).reshape(-1)[:n].to(torch.int8) - 8
            q = t.float()  # a new tensor: scaled in place
            q = (torch.nn.functional.pad(q, (0, nb * e.block - n)) if nb * e.block != n else q).view(nb, e.block)
            t = q.mul_(scale[:, None]).reshape(-1)[:n]
    return t.to(dtype).reshape(e.shape)
