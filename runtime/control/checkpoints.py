"""A worker's local checkpoints: one file per (job, site), written atomically with a checksum, read
back with `weights_only=True` (tensors and plain containers only, never arbitrary objects).

One file per site, because a step streams out one frame per input group: a checkpoint then writes
the sites it fitted, not every site the worker owns."""
from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path

import torch

from ..files import atomic_write

log = logging.getLogger("colaflow.worker")
MAGIC = b"CFCKPT01"  # then the SHA-256 of the torch.save bytes, then those bytes


class Checkpoints:
    """`DIR/<job>/<site>.pt`: what `colaflow.control.worker.Worker` needs to resume each site exactly."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return str(self.path)

    def _dir(self, job: str) -> Path:
        if job in (".", "..") or "/" in job:
            raise ValueError(f"job id {job!r} cannot name a checkpoint directory")
        return self.path / job

    def save(self, job: str, sites: dict[str, dict]) -> None:
        """Write these sites' entries of `job`, each file atomically."""
        for site, entry in sites.items():
            buf = io.BytesIO()
            torch.save(entry, buf)
            data = buf.getbuffer()
            atomic_write(self._dir(job) / f"{site}.pt", MAGIC + hashlib.sha256(data).digest() + bytes(data))

    def load(self) -> dict[str, dict[str, dict]]:
        """Every job's sites; a file that is corrupt is set aside (renamed) and left out, loudly: the
        server's copy of the learner state takes over (exact failover)."""
        if not self.path.exists():
            return {}
        out: dict[str, dict[str, dict]] = {}
        for p in sorted(self.path.glob("*/*.pt")):
            try:
                out.setdefault(p.parent.name, {})[p.stem] = _read(p)
            except Exception as e:  # a torn or flipped file must not stop the worker
                aside = p.with_name(f"{p.name}.corrupt-{int(time.time())}")
                p.rename(aside)
                log.error("checkpoint %s is corrupt (%s); set aside as %s — the server's learner state "
                          "takes over", p, e, aside.name)
        return out

    def remove(self, job: str, sites: list[str] | None = None) -> None:
        """Forget `sites` of `job` (None: the whole job)."""
        folder = self._dir(job)
        for site in sites if sites is not None else [p.stem for p in folder.glob("*.pt")]:
            (folder / f"{site}.pt").unlink(missing_ok=True)
        if sites is None and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


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
        self.jobs: dict[str, dict[str, dict]] = {}

    def __repr__(self) -> str:
        return "memory"

    def save(self, job: str, sites: dict[str, dict]) -> None:
        self.jobs.setdefault(job, {}).update(sites)

    def load(self) -> dict[str, dict[str, dict]]:
        return {job: dict(sites) for job, sites in self.jobs.items()}

    def remove(self, job: str, sites: list[str] | None = None) -> None:
        if sites is None:
            self.jobs.pop(job, None)
        else:
            for site in sites:
                self.jobs.get(job, {}).pop(site, None)
