"""Data maps uploaded in chunks (UploadData), held until one SubmitJob claims them. Bounded.

A hostile tenant must not exhaust the server's memory: an upload declares its size first, and
that size is checked against the per-upload cap, the tenant's share and the server's total before
any byte is kept (the declaration reserves it); each chunk is checked against the chunk cap and
what is left of the declaration. A stream that breaks frees its bytes at once; an upload not
finished or not claimed within `ttl` seconds is freed by the next call. Thread-safe.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from colaflow.errors import ResourceExhausted
from colaflow.wire.framing import MAX_CHUNK_BYTES


@dataclass
class _Upload:
    tenant: str
    total: int
    started: float
    data: bytearray = field(default_factory=bytearray)
    done: bool = False


@dataclass
class UploadLimits:
    max_bytes: int = 256 << 20        # one data map
    max_total: int = 1 << 30          # all uploads held at once, reserved by their declared sizes
    max_per_tenant: int = 512 << 20   # one tenant's share of max_total
    max_chunk: int = MAX_CHUNK_BYTES  # one UploadDataRequest's `data`
    ttl: float = 600.0                # seconds from the first chunk until SubmitJob must claim it


class Uploads:
    def __init__(self, limits: UploadLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits or UploadLimits(), clock
        self._lock = threading.Lock()
        self._uploads: dict[str, _Upload] = {}

    def reserved(self, tenant: str | None = None) -> int:
        """Bytes reserved by live uploads (of `tenant`, or all)."""
        with self._lock:
            self._sweep()
            return sum(u.total for u in self._uploads.values() if tenant is None or u.tenant == tenant)

    def begin(self, tenant: str, total: int) -> str:
        """Reserve `total` bytes for a new upload of `tenant`; its id."""
        lim = self.limits
        if total <= 0:
            raise ValueError("the first chunk must declare `total_bytes`")
        if total > lim.max_bytes:
            raise ResourceExhausted(f"`total_bytes` {total} exceeds the server's cap on one data map, {lim.max_bytes}")
        with self._lock:
            self._sweep()
            held = sum(u.total for u in self._uploads.values() if u.tenant == tenant)
            if held + total > lim.max_per_tenant:
                raise ResourceExhausted(f"uploads of tenant {tenant!r} would hold {held + total} bytes; the cap is "
                                        f"{lim.max_per_tenant} (submit or drop the others first)")
            if sum(u.total for u in self._uploads.values()) + total > lim.max_total:
                raise ResourceExhausted("the server holds as many uploaded bytes as it may; retry later")
            upload_id = secrets.token_hex(16)
            self._uploads[upload_id] = _Upload(tenant, total, self.clock())
            return upload_id

    def add(self, upload_id: str, chunk: bytes) -> None:
        """Append one chunk, checked against the chunk cap and what is left of the declared size."""
        if len(chunk) > self.limits.max_chunk:
            raise ValueError(f"a chunk holds {len(chunk)} bytes; the cap is {self.limits.max_chunk}")
        with self._lock:
            u = self._live(upload_id)
            if u.done:
                raise ValueError(f"upload {upload_id} is finished")
            if len(u.data) + len(chunk) > u.total:
                raise ValueError(f"upload {upload_id}: more than the declared `total_bytes` {u.total}")
            u.data += chunk

    def finish(self, upload_id: str) -> int:
        """Mark the upload complete (all declared bytes in); its size."""
        with self._lock:
            u = self._live(upload_id)
            if len(u.data) != u.total:
                raise ValueError(f"upload {upload_id} ended after {len(u.data)} of its declared {u.total} bytes")
            u.done = True
            return u.total

    def abandon(self, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)

    def claim(self, upload_id: str, tenant: str) -> bytearray:
        """The finished upload's bytes, once; another tenant's upload reads as unknown."""
        with self._lock:
            self._sweep()
            u = self._uploads.get(upload_id)
            if u is None or u.tenant != tenant or not u.done:
                raise KeyError(f"unknown or unfinished upload {upload_id[:40]!r} (an upload is used once, within "
                               f"{self.limits.ttl:.0f} s)")
            del self._uploads[upload_id]
            return u.data  # no copy: msgpack reads it as it is

    def _live(self, upload_id: str) -> _Upload:
        self._sweep()
        u = self._uploads.get(upload_id)
        if u is None:
            raise ValueError(f"upload {upload_id} expired after {self.limits.ttl:.0f} s")
        return u

    def _sweep(self) -> None:
        now = self.clock()
        for k in [k for k, u in self._uploads.items() if now - u.started > self.limits.ttl]:
            del self._uploads[k]
