"""A whole colaflow run on plain objects — the real Host, Scheduler and Workers, no transport —
with faults injected between them: message loss (a dropped connection loses what is in flight),
duplication and late delivery, worker crash and restart, worker loss for good (its disk too), a
lost worker's return (same id, empty disk), workers joining mid-run (each join or return may move
sites for balance), server crash and restart from its store. A toy two-layer model keeps a step under a millisecond,
so property tests can run thousands of schedules.

    sim = Sim(spec, steps=8, workers=2)
    sim.act("crash", 0); sim.act("server_crash"); ...
    final = sim.finish()          # drives the run to its end; the final adapters by site
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from colaflow import Host, JobSpec, Scheduler, Worker
from colaflow.control.checkpoints import MemoryCheckpoints
from colaflow.control.scheduler import Abandoned
from colaflow.control.store import MemoryStore
from colaflow.data.batches import collate

REASSIGN_AFTER = 10.0
# "progress" (deliver everything in flight, then step) is listed thrice: faults should often hit late in a run
ACTIONS = ("progress", "progress", "progress", "step", "to_worker", "to_server", "dup_to_worker", "dup_to_server",
           "disconnect", "connect", "crash", "lose", "join", "rejoin", "tick", "server_crash")


class Toy(nn.Module):
    """Two linear sites and a tanh: (B, T, 4) -> (B, T, 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def toy_loss(out, batch):
    return (out - batch["labels"]).pow(2).sum((1, 2)), torch.full((out.shape[0],), out.shape[1])


def toy_batches(steps: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, 3, 4, generator=g), "labels": torch.randn(2, 3, 4, generator=g)} for _ in range(steps)]


def final_params(scheduler: Scheduler, job: str) -> dict:
    return {s: {n: v.detach().clone() for n, v in ps.items()} for s, ps in scheduler.weights(job).params.items()}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimWorker:
    def __init__(self, name: str, durable: bool):
        self.name = name
        self.disk = MemoryCheckpoints() if durable else None
        self.worker = Worker(name, self.disk)
        self.stream: int | None = None
        self.inbound: deque = deque()  # server -> worker, in flight on the live connection
        self.outbound: deque = deque()  # worker -> server, in flight
        self.delivered_in: list = []  # what this connection delivered (for duplicates)
        self.delivered_out: list = []  # what reached the server, any connection (late duplicates)


class Sim:
    def __init__(self, spec: JobSpec, steps: int, workers: int = 2, durable: bool = True, seed: int = 0):
        self.spec, self.steps, self.durable = spec, steps, durable
        self.batches = toy_batches(steps + 1, seed)
        self.clock = Clock()
        self.store = MemoryStore()
        self.workers: dict[str, SimWorker] = {}
        self.lost: set[str] = set()
        self._server()
        for _ in range(workers):
            self.act("join")

    # the parts

    def _server(self) -> None:
        self.host = Host(Toy(), toy_loss)
        self.sched = Scheduler(self.store, REASSIGN_AFTER, self.clock)
        self.sched.rebalance_after = REASSIGN_AFTER  # sites move for balance as often as a tick allows
        self.sched.settle_after = 0.0  # a joining worker takes its share at once (test_scheduler tests the wait)
        self.running: list | None = None  # the step in progress: [plan, waiting sites, packet groups, result]
        if self.spec.job_id in self.sched.jobs:  # restored
            self.host.add_job(self.spec)
        else:
            self.sched.add_job(self.spec, self.host.add_job(self.spec), self.steps)

    def _connect(self, w: SimWorker) -> None:
        session = self.sched.register(w.name)
        w.stream = self.sched.connect(w.name, session, w.worker.hello())
        self.sched.grant(w.name, w.stream, 1 << 30)
        w.inbound.clear()
        w.delivered_in.clear()
        w.outbound.extend(w.worker.resend())

    def _disconnect(self, w: SimWorker) -> None:
        if w.stream is not None:
            self.sched.disconnect(w.name, w.stream)
        w.stream = None
        w.inbound.clear()  # what was in flight is lost
        w.outbound.clear()

    def _live(self) -> list[SimWorker]:
        return [w for n, w in self.workers.items() if n not in self.lost]

    def _pick(self, i: int) -> SimWorker | None:
        live = self._live()
        return live[i % len(live)] if live else None

    # one action

    def act(self, action: str, i: int = 0) -> bool:
        """Do `action` (to worker `i` where it takes one); True if anything happened."""
        w = self._pick(i)
        if action == "step":
            return self._step()
        if action == "progress":
            moved = False
            for x in self._live():
                while self._to_worker(x) or self._to_server(x):
                    moved = True
            return self._step() or moved
        if action == "join":
            if len(self._live()) >= 4:
                return False
            name = f"w{len(self.workers)}"
            self.workers[name] = SimWorker(name, self.durable)
            self._connect(self.workers[name])
            return True
        if action == "rejoin":  # a lost worker comes back under its id, its disk empty (a new machine)
            lost = sorted(self.lost)
            if not lost:
                return False
            name = lost[i % len(lost)]
            self.lost.discard(name)
            self.workers[name] = SimWorker(name, self.durable)
            self._connect(self.workers[name])
            return True
        if action == "tick":
            self.clock.now += REASSIGN_AFTER
            return True
        if action == "server_crash":  # every connection dies with the process: nothing old arrives after
            for x in self._live():
                x.stream = None
                x.inbound.clear()
                x.outbound.clear()
                x.delivered_out.clear()
            self._server()
            return True
        if w is None:
            return False
        if action == "to_worker":
            return self._to_worker(w)
        if action == "to_server":
            return self._to_server(w)
        if action == "dup_to_worker" and w.stream is not None and w.delivered_in:
            msg = w.delivered_in[i % len(w.delivered_in)]
            w.outbound.extend(w.worker.handle(msg))
            return True
        if action == "dup_to_server" and w.stream is not None and w.delivered_out:  # late, maybe from an old stream
            self._receive(w, w.delivered_out[i % len(w.delivered_out)])
            return True
        if action == "disconnect" and w.stream is not None:
            self._disconnect(w)
            return True
        if action == "connect" and w.stream is None:
            self._connect(w)
            return True
        if action == "crash":  # the process dies; its disk (if any) survives
            self._disconnect(w)
            w.worker = Worker(w.name, w.disk)
            return True
        if action == "lose" and len(self._live()) > 1:  # gone for good, disk and all
            self._disconnect(w)
            self.lost.add(w.name)
            return True
        return False

    def _step(self) -> bool:
        """One piece of a step, as the coordinator runs it: begin (before every site's version is in,
        when nothing else is ready: layered), load each waiting site once its version arrives,
        compute, publish one group of packets per call, finish. Any action may come between pieces,
        as the wire and the workers interleave with the server's step thread."""
        if self.running is None:
            full = self.sched.ready()
            ready = full or self.sched.ready(layered=True)
            if not ready:
                return False
            plan = self.sched.begin(ready[0], layered=not full, held=self.host.versions(ready[0]))
            for u in plan.apply:
                self.host.apply(u)
            self.running = [plan, list(plan.waiting), None, None]
            return True
        plan, waiting, groups, result = self.running
        if waiting:
            try:
                arrived = [(site, self.sched.arrived(plan, site)) for site in waiting]
            except Abandoned:
                self.running = None
                return True
            for site, u in arrived:
                if u is not None:
                    self.host.apply(u)
                    waiting.remove(site)
            if waiting:
                self.sched.ready()  # as the coordinator's wait does: a lost worker's sites move
            return len(waiting) < len(arrived)
        if groups is None:
            groups = []
            result = self.host.step(collate([(plan.job, self.batches[plan.step])]), emit=groups.append,
                                    steps={plan.job: plan.step})
            self.running[2:] = [groups, result]
            return True
        if groups:
            for p in groups.pop(0):
                self.sched.publish(plan, p)
            return True
        self.sched.finish(plan, [], result.losses[plan.job], result.tokens[plan.job])
        self.running = None
        return True

    def _to_worker(self, w: SimWorker) -> bool:
        if w.stream is None:
            return False
        if not w.inbound:
            msg = self.sched.next_message(w.name, w.stream)
            if msg is None:
                return False
            w.inbound.append(msg)
        msg = w.inbound.popleft()
        w.delivered_in.append(msg)
        w.outbound.extend(w.worker.handle(msg))
        return True

    def _to_server(self, w: SimWorker) -> bool:
        if w.stream is None or not w.outbound:
            return False
        msg = w.outbound.popleft()
        w.delivered_out.append(msg)
        self._receive(w, msg)
        return True

    def _receive(self, w: SimWorker, msg) -> None:
        self.sched.receive(w.name, msg)  # an honest worker's message is never refused

    # the end

    def finish(self, max_rounds: int = 20000) -> dict:
        """Deliver, reconnect and step until the job ends; the final adapters."""
        job = self.sched.job(self.spec.job_id)
        for _ in range(max_rounds):
            if job.state != "running" and job.state != "waiting":
                break
            busy = False
            for w in self._live():
                if w.stream is None:
                    self._connect(w)
                    busy = True
                while self._to_worker(w) or self._to_server(w):
                    busy = True
            busy |= self._step()
            if not busy:
                self.clock.now += REASSIGN_AFTER  # nothing moves: let a lost worker's sites go
            job = self.sched.job(self.spec.job_id)
        assert job.state == "done", (job.state, job.error)
        return final_params(self.sched, self.spec.job_id)


def reference(spec: JobSpec, steps: int, seed: int = 0) -> dict:
    """The failure-free run, in-process (`colaflow.Trainer` on the same toy model and data)."""
    from colaflow import Trainer

    trainer = Trainer(Toy(), [spec], loss_fn=toy_loss)
    for b in toy_batches(steps + 1, seed)[:steps]:
        trainer.step({spec.job_id: b})
    return final_params(trainer.scheduler, spec.job_id)
