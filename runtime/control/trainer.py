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
from collections.abc import Iterator

from torch import nn
from tqdm.auto import tqdm

from ..adapters.base import Adapter
from ..data.batches import collate
from ..engine.blackbox import BlackBoxHost
from ..engine.evaluate import EvalSet, Metric, evaluate
from ..engine.host import Host
from ..engine.loss import LossFn, causal_lm
from ..job import JobSpec
from ..wire import codec
from .admission import admit, prepare
from .protocol import Packets
from .records import LIVE
from .scheduler import Scheduler
from .worker import Worker

LOCAL = "local"


class Trainer:
    """Runs jobs in-process: the jobs of one `step` call share one forward (a mixed batch)."""

    def __init__(self, model: nn.Module | BlackBoxHost, jobs: list[JobSpec], loss_fn: LossFn = causal_lm,
                 checkpointing: bool = False):
        # a BlackBoxHost: black-box jobs served from a `logprobs` callable alone (colaflow.engine.blackbox)
        self.host = model if isinstance(model, BlackBoxHost) else Host(model, loss_fn, checkpointing=checkpointing)
        self.scheduler = Scheduler()
        self.worker = Worker(LOCAL)
        self.specs: dict[str, JobSpec] = {}
        self.evals: dict[str, EvalSet] = {}
        self._stream = self.scheduler.connect(LOCAL, self.scheduler.register(LOCAL), self.worker.hello())
        self.scheduler.grant(LOCAL, self._stream, 1 << 62)  # in-process: no flow control needed
        for spec in jobs:
            self.add_job(spec)

    def add_job(self, spec: JobSpec, steps: int | None = None, evals: EvalSet | None = None,
                init: dict[str, dict] | None = None, data: dict | None = None,
                metric: Metric | None = None) -> Iterator[dict] | None:
        """Add a job (open-ended, or done after `steps` steps), its adapters from `init` ({site: params}) if
        given, evaluated on `evals` while it trains. With `data` (a data map, whose `eval` entry is the eval
        set), returns its batches."""
        a = prepare(self.host, spec, data, evals, metric)
        admit(self.host, self.scheduler, a, steps, init=init)
        if a.evals is not None:
            self.evals[a.spec.job_id] = a.evals
        self.specs[a.spec.job_id] = a.spec
        self._deliver()
        return a.batches

    @property
    def history(self) -> dict[str, list[float]]:
        """Each job's loss per step so far (its metrics rows')."""
        return {job: self.scheduler.job(job).losses for job in self.specs}

    def step(self, batches: dict[str, dict]) -> dict[str, float]:
        """One server step over the jobs in `batches` ({job_id: batch}); returns their losses."""
        plans = [self.scheduler.begin(job, held=self.host.versions(job)) for job in batches]
        for plan in plans:
            for load in plan.apply:
                self.host.apply(load)
        t0 = time.perf_counter()
        result = self.host.step(collate(list(batches.items())), steps={p.job: p.step for p in plans})
        seconds = time.perf_counter() - t0
        for plan in plans:
            packets = [p for p in result.packets if p.job == plan.job]
            ev, steps = self.evals.get(plan.job), self.scheduler.job(plan.job).steps
            evals = evaluate(self.host, plan.job, ev) if ev is not None and ev.due(plan.step, steps) else None
            self.scheduler.finish(plan, packets, result.losses[plan.job], result.tokens[plan.job], seconds, evals)
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
            for load in self.scheduler.latest(job):
                self.host.apply(load)

    def _deliver(self) -> None:
        """Synchronous delivery: move messages both ways until neither side has anything left."""
        while (msg := self.scheduler.next_message(LOCAL, self._stream)) is not None:
            for reply in self.worker.handle(self._through_codecs(msg)):
                self.scheduler.receive(LOCAL, reply)
        for job in self.scheduler.take_ended():
            if self.scheduler.job(job).state == "failed":
                raise RuntimeError(f"job {job!r} failed: {self.scheduler.job(job).error}")

    def _through_codecs(self, msg):
        """Packets as the job's wire codecs deliver them (`codec.through`, with the wire's own seeds),
        so a lossy codec trains here exactly as over gRPC."""
        if not isinstance(msg, Packets):
            return msg
        spec = self.specs[msg.job]
        if spec.codec_x == spec.codec_g == "raw":
            return msg
        xs: dict[int, object] = {}  # an input shared by several sites travels (and arrives) once
        out = []
        for p in msg.packets:
            if p.stats is not None:  # projected: each statistic in the gradient codec, as serde sends it
                stats = {k: codec.through(t, spec.codec_g, codec.packet_salt(msg.job, msg.step, f"{p.site}/{k}"))
                         for k, t in p.stats.items()}
                out.append(type(p)(p.job, p.site, p.step, p.version, None, None, None, stats))
                continue
            if id(p.x) not in xs:
                xs[id(p.x)] = codec.through(p.x, spec.codec_x, codec.packet_salt(msg.job, msg.step, "x"))
            g = codec.through(p.g, spec.codec_g, codec.packet_salt(msg.job, msg.step, p.site))
            out.append(type(p)(p.job, p.site, p.step, p.version, xs[id(p.x)], g, p.route))
        return Packets(msg.job, msg.step, out)

    def adapters(self, job_id: str) -> dict[str, Adapter]:
        """The device-side (authoritative) adapters of a job, by site name."""
        if job_id not in self.specs:
            raise KeyError(f"unknown job {job_id!r}; jobs: {sorted(self.specs)}")
        return {site: learner.adapter for (j, site), learner in self.worker.learners.items() if j == job_id}
