"""The only place tensors become bytes and back: raw little-endian, bf16, fp16, int8 blockwise.

    enc = encode(g, "int8")        # Encoded(dtype="float32", shape=(N, D), codec="int8", data, scales, block)
    g2 = decode(enc)               # float32 again; |g2 - g| <= absmax(block) / 254 elementwise

Error bounds (per element, for values in range): raw exact; bf16 relative 2^-8; fp16 relative
2^-11 (|x| <= 65504, else refused); int8 absolute absmax(block)/254.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

CODECS = ("raw", "bf16", "fp16", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
INT8_BLOCK = 64  # 1 + 4/64 = 1.0625 bytes per element
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


def _name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype {dtype} cannot travel; allowed: {sorted(DTYPES)}")


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's little-endian bytes as a uint8 view: no copy for contiguous CPU tensors."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy()


def encode(t: torch.Tensor, codec: str = "raw") -> Encoded:
    """Encode a tensor; floating tensors may use a lossy codec, integer ones travel raw."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")
    dtype = _name(t.dtype)
    if not t.is_floating_point() or codec == "raw":
        return Encoded(dtype, tuple(t.shape), "raw", _bytes(t))
    if codec == "bf16":
        return Encoded(dtype, tuple(t.shape), codec, _bytes(t.to(torch.bfloat16)))
    if codec == "fp16":
        if t.numel() and float(t.abs().max()) > 65504:
            raise ValueError(f"a value of magnitude {float(t.abs().max()):.3g} overflows fp16; use bf16 or int8")
        return Encoded(dtype, tuple(t.shape), codec, _bytes(t.to(torch.float16)))
    flat = t.detach().float().reshape(-1)
    pad = (-flat.numel()) % INT8_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, INT8_BLOCK)  # (nb, block)
    scale = blocks.abs().amax(1, keepdim=True) / 127.0  # (nb, 1)
    q = torch.round(blocks / scale.clamp_min(1e-30)).clamp_(-127, 127).to(torch.int8)
    return Encoded(dtype, tuple(t.shape), codec, _bytes(q.reshape(-1)[:flat.numel()]), _bytes(scale), INT8_BLOCK)


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
    wire = {"raw": dtype, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}[e.codec]
    if e.codec != "raw" and not dtype.is_floating_point:
        raise ValueError(f"codec {e.codec!r} applies to floating tensors, not {e.dtype}")
    itemsize = torch.empty(0, dtype=wire).element_size()
    if len(e.data) != n * itemsize:
        raise ValueError(f"tensor `data` has {len(e.data)} bytes; shape {e.shape} in {e.codec} needs {n * itemsize}")
    with warnings.catch_warnings():  # read-only buffers: the receiver never writes into them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(e.data, dtype=wire, count=n) if n else torch.empty(0, dtype=wire)
        if e.codec == "int8":
            nb = -(-n // e.block) if e.block > 0 else -1
            if e.block <= 0 or len(e.scales) != 4 * nb:
                raise ValueError(f"int8 tensor has {len(e.scales)} scale bytes for block {e.block}; "
                                 f"needs {4 * max(nb, 0)}")
            scale = torch.frombuffer(e.scales, dtype=torch.float32, count=nb) if nb else torch.empty(0)
            pad = nb * e.block - n
            q = torch.nn.functional.pad(t.float(), (0, pad)).view(nb, e.block)
            t = (q * scale[:, None]).reshape(-1)[:n]
    return t.to(dtype).reshape(e.shape)
