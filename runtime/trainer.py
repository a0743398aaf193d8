"""The reference loop: a server step and the device fits in one process.

This is the path every transport wraps, never forks: `Host.step` makes packets, `Learner.consume`
fits, `Host.apply` takes the updates at a step boundary.

    trainer = Trainer(model, [JobSpec("acme", LowRank(r=8), AdamW(lr=1e-3))])
    for _ in range(100):
        trainer.step({"acme": next(acme_batches)})
    trainer.adapters("acme")   # {site: adapter module}
"""
from __future__ import annotations

from typing import Iterator

from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .data import collate
from .gl import Learner, Update
from .job import JobSpec
from .loss import LossFn, causal_lm


class Trainer:
    """Runs jobs in-process: one mixed batch per step, every (job, site) fitted by its Learner."""

    def __init__(self, model: nn.Module, jobs: list[JobSpec], loss_fn: LossFn = causal_lm):
        from colaflow.server.host import Host  # the server half of the loop

        self.host = Host(model, loss_fn)
        self.specs = {s.job_id: s for s in jobs}
        self.learners: dict[tuple[str, str], Learner] = {}
        for spec in jobs:
            for site in self.host.add_job(spec):
                self.learners[(spec.job_id, site.name)] = Learner(spec, site)
        self._pending: list[tuple[int, Update]] = []  # (step from which the server uses it, update)
        self.history: dict[str, list[float]] = {j: [] for j in self.specs}

    def step(self, batches: dict[str, dict]) -> dict[str, float]:
        """One server step over the jobs in `batches` ({job_id: batch}); returns their losses."""
        self._apply_due()
        result = self.host.step(collate(list(batches.items())))
        for packet in result.packets:
            update = self.learners[(packet.job, packet.site)].consume(packet)
            if update is not None:
                # With staleness S the server may run S more steps before it sees this update.
                self._pending.append((result.step + 1 + self.specs[update.job].staleness, update))
        for job, loss in result.losses.items():
            self.history[job].append(loss)
        return result.losses

    def run(self, data: dict[str, Iterator[dict]], steps: int, progress: bool = True) -> dict[str, list[float]]:
        """`steps` steps, each taking the next batch of every job in `data`."""
        bar = tqdm(range(steps), desc="colaflow", disable=not progress, unit="step")
        for _ in bar:
            losses = self.step({j: next(it) for j, it in data.items()})
            bar.set_postfix({j: f"{v:.3f}" for j, v in list(losses.items())[:4]})
        self.flush()
        return self.history

    def flush(self) -> None:
        """Apply every update still in flight (the end of a run)."""
        for _, update in self._pending:
            self.host.apply(update)
        self._pending.clear()

    def _apply_due(self) -> None:
        now = self.host.steps
        due = [u for at, u in self._pending if at <= now]
        self._pending = [(at, u) for at, u in self._pending if at > now]
        for update in due:
            self.host.apply(update)

    def adapters(self, job_id: str) -> dict[str, Adapter]:
        """The device-side (authoritative) adapters of a job, by site name."""
        if job_id not in self.specs:
            raise KeyError(f"unknown job {job_id!r}; jobs: {sorted(self.specs)}")
        return {site: l.adapter for (j, site), l in self.learners.items() if j == job_id}
