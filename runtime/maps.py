"""Schema-flexible maps on the wire (specs, data, metrics): msgpack, never pickle. No torch here, so
the control client (and the operator CLI) load fast; `colaflow.wire.control_serde` re-exports these."""
from __future__ import annotations

import msgpack


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, field: str = "map"):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types; all mean the same to the sender
        raise ValueError(f"`{field}` is not valid msgpack: {e}") from None
