"""A job's status as every caller sees it — the scheduler's view, the control service's answer, the
client's return value and `Session`'s dict — and the states a job moves through. Torch-free: the
operator CLI imports it."""
from __future__ import annotations

from dataclasses import dataclass, field

LIVE = ("waiting", "running")  # waiting: for owners of all its sites; running: stepping
ENDED = ("done", "cancelled", "failed")


@dataclass
class JobInfo:
    """A job's status as plain Python: what `Client.get`, `list` and `cancel` return."""

    job: str
    state: str  # waiting, running, done, cancelled, failed
    step: int  # steps run so far
    steps: int
    loss: float  # of the last step (0.0 before the first)
    error: str = ""  # why it failed or was cancelled
    max_staleness: int = 0
    workers: list[str] = field(default_factory=list)  # who owns its sites now
    versions: dict[str, int] = field(default_factory=dict, repr=False)  # newest version the server holds, per site

    def __repr__(self) -> str:
        error = f", error={self.error!r}" if self.error else ""
        return (f"JobInfo(job={self.job!r}, state={self.state!r}, step={self.step}/{self.steps}, "
                f"loss={self.loss:.4f}{error}, workers={self.workers!r})")

    def as_dict(self) -> dict:
        """{job, state, step, steps, loss, error, max_staleness, workers}: `Session`'s status dicts, `--json`."""
        return {"job": self.job, "state": self.state, "step": self.step, "steps": self.steps, "loss": self.loss,
                "error": self.error, "max_staleness": self.max_staleness, "workers": list(self.workers)}
