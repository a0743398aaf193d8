"""A worker's local checkpoints: one file per job, written atomically, read back with
`weights_only=True` (tensors and plain containers only, never arbitrary objects)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from .files import atomic_write


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
        atomic_write(self._file(job), buf.getbuffer())

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        return {p.stem: torch.load(p, weights_only=True, map_location="cpu") for p in sorted(self.path.glob("*.pt"))}

    def remove(self, job: str) -> None:
        self._file(job).unlink(missing_ok=True)


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
