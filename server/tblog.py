"""`colaflow serve --tensorboard DIR`: every job's per-step metrics as TensorBoard scalars, in DIR/JOB.

A thread polls the coordinator's metrics (as the status page does) and writes each numeric key
(`loss`, `eval_*`, `lr`, `tokens`, `staleness`, ...) at its step. A job's writer (a file and a
thread) is closed once the job has ended and its last rows are written; a deleted job is forgotten.
Optional: without the `tensorboard` package the flag fails at start with what to install.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

from colaflow.control.status import LIVE

from .coordinator import Coordinator

log = logging.getLogger("colaflow.server")
SKIP = {"step", "time"}


class TensorBoardLog:
    def __init__(self, directory: str | Path, writer_cls, interval: float = 2.0):
        self.dir, self.writer_cls, self.interval = Path(directory), writer_cls, interval
        self.writers: dict = {}  # live jobs' writers (each holds an event file and a thread)
        self.seen: dict[str, int] = {}  # rows written, per job the scheduler still has
        self.closed: set[str] = set()  # ended jobs whose every row is written
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def check(cls, directory: str | Path) -> TensorBoardLog:
        """A logger into `directory`, or SystemExit saying what to install."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("colaflow serve: --tensorboard needs the `tensorboard` package: "
                             "pip install tensorboard") from None
        return cls(directory, SummaryWriter)

    def write(self, coordinator: Coordinator) -> int:
        """Write every metrics row not written yet; returns how many rows."""
        n, listed = 0, set()
        for view in coordinator.scheduler.jobs_view():
            job = view["job"]
            listed.add(job)
            if job in self.closed:
                continue
            try:
                rows, ended = coordinator.scheduler.metrics(job, self.seen.get(job, 0))
            except KeyError:
                continue
            if not rows:
                if ended or view["state"] not in LIVE:
                    self._close(job)
                continue
            if job not in self.writers:  # a job id is a path component here, made safe
                self.writers[job] = self.writer_cls(str(self.dir / quote(job, safe="")))
            w = self.writers[job]
            for row in rows:
                for key, value in row.items():
                    if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                        w.add_scalar(key, value, global_step=row.get("step", 0))
            w.flush()
            self.seen[job] = self.seen.get(job, 0) + len(rows)
            n += len(rows)
            if ended:
                self._close(job)
        for job in (set(self.seen) | self.closed) - listed:  # deleted: nothing more will come
            self._close(job)
            self.seen.pop(job, None)
            self.closed.discard(job)
        return n

    def _close(self, job: str) -> None:
        w = self.writers.pop(job, None)
        if w is not None:
            w.close()
        self.closed.add(job)

    def start(self, coordinator: Coordinator) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.write(coordinator)
                except Exception:  # logging must never take the server down
                    log.exception("tensorboard logging failed")
            self.write(coordinator)
        self.thread = threading.Thread(target=loop, name="colaflow-tensorboard", daemon=True)
        self.thread.start()
        log.info("writing TensorBoard scalars under %s", self.dir)

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(10)
        for w in self.writers.values():
            w.close()
