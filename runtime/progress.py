"""How `Job.wait` shows a job's progress: a bar in a terminal, a plain line every ~30 s in a log.

A script's output file, CI and a notebook's log cannot draw a bar; without a line now and then they
show nothing for as long as the job runs, and nobody can tell a slow job from a stuck one.
"""
from __future__ import annotations

import time

PROGRESS_EVERY_S = 30.0  # a line this often where no bar can be drawn: a log shows the job is alive


class ProgressReport:
    """How `wait` shows a job's progress: a tqdm bar ("bar"), a plain line every PROGRESS_EVERY_S
    seconds and one at the end ("lines"), or nothing ("off")."""

    def __init__(self, show: str, total: int, job: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=job, unit="step", disable=show != "bar")
        self.lines, self.total, self.job = show == "lines", total, job
        self.start = self.said = time.monotonic()
        self.step, self.first, self.loss = 0, None, None

    def update(self, step: int, loss: float | None = None) -> None:
        """The job is at `step` (steps done), its last loss `loss`."""
        self.bar.update(max(0, step - self.bar.n))
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        self.first = step if self.first is None else self.first
        self.step, self.loss = step, loss
        if self.lines and time.monotonic() - self.said >= PROGRESS_EVERY_S:
            self._say()

    def _say(self) -> None:
        self.said = now = time.monotonic()
        rate = (self.step - self.first) / (now - self.start) if now > self.start and self.first is not None else 0.0
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        eta = f", ETA {_duration((self.total - self.step) / rate)}" if rate > 0 and self.step < self.total else ""
        print(f"job {self.job}: step {self.step}/{self.total}{loss}, {rate:.2f} steps/s{eta}", flush=True)

    def __enter__(self) -> ProgressReport:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.lines and exc[0] is None:
            self._say()


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 60 else f"{s // 60:.0f} min {s % 60:.0f} s" if s < 3600 else \
        f"{s // 3600:.0f} h {s % 3600 // 60:.0f} min"
