"""Local checkpoints of a worker's learners: written atomically, read back with weights_only."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .gl import Learner


def _name(job: str, site: str) -> str:
    return f"{job}__{site}.pt"


def save_learner(state_dir: Path, learner: Learner, fitted_through: int) -> Path:
    """Write the learner's full state (adapter, optimizer, schedule, version) beside its progress."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / _name(learner.spec.job_id, learner.site.name)
    state = {"spec": learner.spec.to_dict(), "site": learner.site.to_dict(), "fitted_through": fitted_through,
             "learner": learner.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_all(state_dir: Path) -> list[dict]:
    """Every checkpoint in `state_dir` as {spec, site, fitted_through, learner}."""
    if not state_dir.exists():
        return []
    out = []
    for p in sorted(state_dir.glob("*.pt")):
        out.append(torch.load(p, weights_only=True, map_location="cpu"))
    return out


def remove(state_dir: Path, job: str, site: str) -> None:
    (state_dir / _name(job, site)).unlink(missing_ok=True)
