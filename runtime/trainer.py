"""The reference loop: the server's step and the devices' fits in one process.

The same three objects every transport runs — `Host` (the capture step), `Scheduler` and
`Worker` — with synchronous delivery: each step's packets reach the worker, and its updates the
scheduler, before the next step begins.

    trainer = Trainer(model, [JobSpec("acme", LowRank(r=8), AdamW(lr=1e-3))])
    for _ in range(100):
        trainer.step({"acme": next(acme_batches)})
    trainer.adapters("acme")   # {site: adapter module}
"""
from __future__ import annotations

import time
from typing import Iterator


from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .blackbox import BlackBoxHost
from .classify import classification_spec
from .data import collate
from .evaluate import EvalSet, evaluate
from .host import Host
from .job import JobSpec
from .loss import LossFn, causal_lm
from . import serde
from .protocol import Packets
from .records import LIVE
from .scheduler import Scheduler
from .worker import Worker

LOCAL = "local"


class Trainer:
    """Runs jobs in-process: the jobs of one `step` call share one forward (a mixed batch)."""

    def __init__(self, model: nn.Module | BlackBoxHost, jobs: list[JobSpec], loss_fn: LossFn = causal_lm):
        # a BlackBoxHost: black-box jobs served from a `logprobs` callable alone (colaflow.blackbox)
        self.host = model if isinstance(model, BlackBoxHost) else Host(model, loss_fn)
        self.scheduler = Scheduler()
        self.worker = Worker(LOCAL)
        self.specs: dict[str, JobSpec] = {}
        self.evals: dict[str, EvalSet] = {}
        self.history: dict[str, list[float]] = {}
        self._stream = self.scheduler.connect(LOCAL, self.scheduler.register(LOCAL), self.worker.hello())
        self.scheduler.grant(LOCAL, self._stream, 1 << 62)  # in-process: no flow control needed
        for spec in jobs:
            self.add_job(spec)

    def add_job(self, spec: JobSpec, steps: int | None = None, evals: EvalSet | None = None,
                init: dict[str, dict] | None = None) -> None:
        """Add a job (open-ended, or done after `steps` steps), its adapters from `init` ({site: params}) if
        given, evaluated on `evals` while it trains."""
        spec = classification_spec(spec, getattr(self.host, "model", None))  # a classifier's head trains too
        sites = self.host.add_job(spec, init)
        try:
            self.scheduler.add_job(spec, sites, steps, init=init)
        except BaseException:
            self.host.remove_job(spec.job_id)  # nothing half-made stays behind
            raise
        if evals is not None:
            self.evals[spec.job_id] = evals
            self.scheduler.job(spec.job_id).watch = evals.watch
        self.specs[spec.job_id] = spec
        self.history[spec.job_id] = []
        self._deliver()

    def step(self, batches: dict[str, dict]) -> dict[str, float]:
        """One server step over the jobs in `batches` ({job_id: batch}); returns their losses."""
        plans = [self.scheduler.begin(job) for job in batches]
        for plan in plans:
            for update in plan.apply:
                self.host.apply(update)
        t0 = time.perf_counter()
        result = self.host.step(collate(list(batches.items())))
        seconds = time.perf_counter() - t0
        for plan in plans:
            packets = [p for p in result.packets if p.job == plan.job]
            ev, steps = self.evals.get(plan.job), self.scheduler.job(plan.job).steps
            evals = evaluate(self.host, plan.job, ev) if ev is not None and ev.due(plan.step, steps) else None
            self.scheduler.finish(plan, packets, result.losses[plan.job], result.tokens[plan.job], seconds, evals)
            self.history[plan.job].append(result.losses[plan.job])
        self._deliver()
        return result.losses

    def run(self, data: dict[str, Iterator[dict]], steps: int, progress: bool = True) -> dict[str, list[float]]:
        """`steps` steps, each taking the next batch of every job in `data`."""
        bar = tqdm(range(steps), desc="colaflow", disable=not progress, unit="step")
        for _ in bar:
            live = {j: it for j, it in data.items() if self.scheduler.job(j).state in LIVE}
            if not live:
                break  # every job ended (e.g. stopped early on its eval)
            losses = self.step({j: next(it) for j, it in live.items()})
            bar.set_postfix({j: f"{v:.3f}" for j, v in list(losses.items())[:4]})
        self.flush()
        return self.history

    def flush(self) -> None:
        """Load every job's newest adapters into the server's copies (the end of a run)."""
        for job in self.specs:
            for update in self.scheduler.latest(job):
                self.host.apply(update)

    def _deliver(self) -> None:
        """Synchronous delivery: move messages both ways until neither side has anything left."""
        while (msg := self.scheduler.next_message(LOCAL, self._stream)) is not None:
            for reply in self.worker.handle(self._through_codecs(msg)):
                self.scheduler.receive(LOCAL, reply)
        for job in self.scheduler.take_ended():
            if self.scheduler.job(job).state == "failed":
                raise RuntimeError(f"job {job!r} failed: {self.scheduler.job(job).error}")

    def _through_codecs(self, msg):
        """Packets as the job's wire codecs deliver them (the wire's own encoding and decoding), so a
        lossy codec trains here exactly as over gRPC."""
        if not isinstance(msg, Packets):
            return msg
        spec = self.specs[msg.job]
        if spec.codec_x == spec.codec_g == "raw":
            return msg
        return serde.packets_from_proto(*serde.packets_to_proto(msg, spec.codec_x, spec.codec_g))

    def adapters(self, job_id: str) -> dict[str, Adapter]:
        """The device-side (authoritative) adapters of a job, by site name."""
        if job_id not in self.specs:
            raise KeyError(f"unknown job {job_id!r}; jobs: {sorted(self.specs)}")
        return {site: l.adapter for (j, site), l in self.worker.learners.items() if j == job_id}
