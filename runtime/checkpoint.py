"""A worker's local checkpoints: one file per job, written atomically with a checksum, read back
with `weights_only=True` (tensors and plain containers only, never arbitrary objects)."""
from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import torch

from .files import atomic_write

log = logging.getLogger("colaflow.worker")
MAGIC = b"CFCKPT01"  # then the SHA-256 of the torch.save bytes, then those bytes


class Checkpoints:
    """`DIR/<job>.pt` per job: what `colaflow.worker.Worker` needs to resume exactly."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return str(self.path)

    def _file(self, job: str) -> Path:
        return self.path / f"{job}.pt"

    def save(self, job: str, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        atomic_write(self._file(job), MAGIC + hashlib.sha256(data).digest() + bytes(data))

    def load(self) -> dict[str, dict]:
        """Every job's checkpoint; one that is corrupt is set aside (renamed) and left out, loudly:
        the server's copy of the learner state takes over (exact failover)."""
        if not self.path.exists():
            return {}
        out = {}
        for p in sorted(self.path.glob("*.pt")):
            try:
                out[p.stem] = _read(p)
            except Exception as e:  # a torn or flipped file must not stop the worker
                aside = p.with_name(f"{p.name}.corrupt-{int(time.time())}")
                p.rename(aside)
                log.error("checkpoint %s is corrupt (%s); set aside as %s — the server's learner state "
                          "takes over", p, e, aside.name)
        return out

    def remove(self, job: str) -> None:
        self._file(job).unlink(missing_ok=True)


def _read(path: Path) -> dict:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError("no colaflow checkpoint header")
    digest, data = raw[len(MAGIC):len(MAGIC) + 32], raw[len(MAGIC) + 32:]
    if hashlib.sha256(data).digest() != digest:
        raise ValueError("checksum mismatch")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class MemoryCheckpoints(Checkpoints):
    """Checkpoints in a dict: they survive a `Worker` being dropped (a simulated crash), not its loss."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def __repr__(self) -> str:
        return "memory"

    def save(self, job: str, state: dict) -> None:
        self.jobs[job] = state

    def load(self) -> dict[str, dict]:
        return dict(self.jobs)

    def remove(self, job: str) -> None:
        self.jobs.pop(job, None)
