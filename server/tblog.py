"""`colaflow serve --tensorboard DIR`: every job's per-step metrics as TensorBoard scalars, in DIR/JOB.

A thread polls the coordinator's metrics (as the status page does) and writes each numeric key
(`loss`, `eval_*`, `lr`, `tokens`, `staleness`, ...) at its step. Optional: without the
`tensorboard` package the flag fails at start with what to install.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

from .coordinator import Coordinator

log = logging.getLogger("colaflow.server")
SKIP = {"step", "time"}


class TensorBoardLog:
    def __init__(self, directory: str | Path, writer_cls, interval: float = 2.0):
        self.dir, self.writer_cls, self.interval = Path(directory), writer_cls, interval
        self.writers: dict = {}
        self.seen: dict[str, int] = {}
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
        n = 0
        for view in coordinator.scheduler.jobs_view():
            job = view["job"]
            try:
                rows, _ = coordinator.scheduler.metrics(job, self.seen.get(job, 0))
            except KeyError:
                continue
            if not rows:
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
        return n

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
