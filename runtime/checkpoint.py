"""Local checkpoints of a worker's learners, one file per job: written atomically, read back
with `weights_only=True` (tensors and plain containers only, never arbitrary objects)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .gl import Learner


def _path(state_dir: Path, job: str) -> Path:
    return state_dir / f"{job}.pt"


def save_job(state_dir: Path, job: str, learners: dict[str, Learner], fitted: dict[str, int]) -> Path:
    """Write every learner of `job` this worker owns (adapter, optimizer, schedule, version, progress)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {site: {"spec": l.spec.to_dict(), "site": l.site.to_dict(), "fitted_through": fitted[site],
                    "learner": l.state_dict()} for site, l in learners.items()}
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        # atomic against a killed process; no fsync per step: after a power cut the server still
        # holds every acknowledged version and the worker resumes from it
        os.replace(tmp, _path(state_dir, job))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return _path(state_dir, job)


def load_all(state_dir: Path) -> list[dict]:
    """Every checkpointed learner in `state_dir` as {spec, site, fitted_through, learner}."""
    if not state_dir.exists():
        return []
    out = []
    for p in sorted(state_dir.glob("*.pt")):
        out += list(torch.load(p, weights_only=True, map_location="cpu").values())
    return out


def remove(state_dir: Path, job: str) -> None:
    _path(state_dir, job).unlink(missing_ok=True)
