"""The service's coordinator without gRPC (an in-process worker pumps its messages)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from colaflow import AdamW, JobSpec, LowRank, Trainer, Worker
from colaflow.data.batches import from_map
from colaflow.engine.host import Host
from colaflow.export import adapters_of
from colaflow.models import tiny
from colaflow.server.coordinator import Coordinator
from procs import examples

ROOT = Path(__file__).resolve().parents[1]


def data(n: int = 8, seed: int = 0, batch_size: int = 4) -> dict:
    return {"examples": examples(96, n, seed), "batch_size": batch_size, "seed": 0}


class Pumped:
    """A coordinator on a tiny Llama and one in-process worker; `run()` drives both to quiescence."""

    def __init__(self, mix: bool = False):
        # one thread drives both sides, so no update can arrive during a step: no layered start
        self.c = Coordinator(Host(tiny("llama")), mix=mix, layered=False)
        self.worker = Worker("w")
        self.stream = self.c.scheduler.connect("w", self.c.scheduler.register("w", {}), self.worker.hello())
        self.c.scheduler.grant("w", self.stream, 1000)

    def run(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            busy = self.c.step_once()
            while (msg := self.c.scheduler.next_message("w", self.stream)) is not None:
                busy = True
                for reply in self.worker.handle(msg):
                    self.c.scheduler.receive("w", reply)
            if not busy:
                return


def test_a_finished_job_frees_the_host_and_still_exports(tmp_path):
    p = Pumped()
    hooks_before = len(p.c.host._hooks)
    p.c.submit(JobSpec("a", LowRank(r=4), AdamW(lr=1e-2)), data(), steps=4)
    assert len(p.c.host._hooks) > hooks_before
    p.run()
    assert p.c.scheduler.status("a").state == "done"
    p.c.step_once()  # the loop frees what ended
    assert "a" not in p.c.host.jobs and not p.c.host._hooks and "a" not in p.c.data
    weights = p.c.scheduler.weights("a")
    assert set(weights.versions.values()) == {4}
    exported = adapters_of(weights)
    trainer = Trainer(tiny("llama"), [JobSpec("a", LowRank(r=4), AdamW(lr=1e-2))])  # the same run in-process
    batches = from_map(data())
    for _ in range(4):
        trainer.step({"a": next(batches)})
    for site, a in trainer.adapters("a").items():
        assert torch.equal(exported[site].B, a.B.detach()) and torch.equal(exported[site].A, a.A.detach())


def _unlabelled() -> dict:
    """Data whose batches carry no labelled token: the step's loss refuses them (ValueError)."""
    bad = data()
    for e in bad["examples"]:
        e["labels"] = [-100] * len(e["input_ids"])
    return {**bad, "batch_size": 8}


def test_a_failing_step_fails_its_job_with_a_traceback_and_the_loop_goes_on(caplog):
    p = Pumped()
    p.c.submit(JobSpec("bad", LowRank(r=4)), _unlabelled(), steps=3)
    p.c.submit(JobSpec("good", LowRank(r=4)), data(seed=1), steps=3)
    with caplog.at_level(logging.ERROR, "colaflow"):
        p.run()
    assert p.c.scheduler.status("good").state == "done"
    status = p.c.scheduler.status("bad")
    assert status.state == "failed" and "carry no labelled token" in status.error
    tracebacks = [r for r in caplog.records if r.exc_info and "bad" in r.getMessage()]
    assert tracebacks, "the failure was logged without its traceback"


def test_a_mixed_step_that_fails_is_retried_job_by_job():
    p = Pumped(mix=True)
    p.c.submit(JobSpec("good", LowRank(r=4)), data(seed=1), steps=3)
    p.c.submit(JobSpec("bad", LowRank(r=4)), _unlabelled(), steps=3)
    p.run()
    assert p.c.scheduler.status("bad").state == "failed" and p.c.scheduler.status("good").state == "done"


def test_a_stale_stream_is_closed():
    p = Pumped()
    newer = p.c.scheduler.connect("w", p.c.scheduler.register("w", {}), p.worker.hello())
    assert not p.c.scheduler.current("w", p.stream)  # the Work servicer ends a stream that is not current
    assert p.c.scheduler.next_message("w", p.stream) is None
    assert p.c.scheduler.current("w", newer) and p.c.scheduler.next_message("w", newer) is None


def test_optimizers_register_like_adapters():
    from dataclasses import dataclass
    from typing import ClassVar

    from colaflow.learn.optim import OptimizerSpec, optimizer_kinds, register_optimizer

    @dataclass(frozen=True)
    class Lion(OptimizerSpec):  # stands in for a user's optimizer; built as SGD for the test
        kind: ClassVar[str] = "lion-test"

        def _build(self, params):
            return torch.optim.SGD(params, lr=self.lr)

    register_optimizer(Lion)
    assert "lion-test" in optimizer_kinds()
    spec = JobSpec.from_dict(JobSpec("a", optimizer=Lion(lr=0.1)).to_dict())
    assert isinstance(spec.optimizer, Lion)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(Lion)


def test_a_batch_size_larger_than_the_data_is_refused_at_submit():
    p = Pumped()
    with pytest.raises(ValueError, match="`batch_size` 8 is larger than the 1 examples"):
        p.c.submit(JobSpec("tiny", LowRank(r=4)), {"examples": examples(96, 1, 0), "batch_size": 8}, steps=2)
    assert "tiny" not in p.c.scheduler.jobs and "tiny" not in p.c.host.jobs  # nothing half-made is left


def test_token_ids_and_lengths_are_checked_against_the_model_at_submit():
    p = Pumped()
    bad = data()
    bad["examples"][3]["input_ids"][0] = 10_000  # beyond the vocabulary of 96
    with pytest.raises(ValueError, match=r"`data.examples\[3\]` holds token id 10000; the model's vocabulary is 0..95"):
        p.c.submit(JobSpec("oov", LowRank(r=4)), bad, steps=2)
    long = data()
    long["examples"][1] = {"input_ids": [1] * 200}  # the tiny model's context is 128
    with pytest.raises(ValueError, match=r"`data.examples\[1\]` has 200 tokens; the model's context is 128"):
        p.c.submit(JobSpec("long", LowRank(r=4)), long, steps=2)
    assert not p.c.scheduler.jobs and not p.c.host.jobs


def test_a_layered_step_starts_before_its_lower_layers_are_fitted_and_stays_exact():
    """S = 0 over a slow device: the server starts step t+1 while the device still fits step t's lower
    layers (the forward waits at each site for its own version), and the run equals the in-process one."""
    import threading
    import time

    c = Coordinator(Host(tiny("llama")))  # layered by default
    worker = Worker("w")
    stream = c.scheduler.connect("w", c.scheduler.register("w", {}), worker.hello())
    c.scheduler.grant("w", stream, 1000)
    plans = []
    begin = c.scheduler.begin
    c.scheduler.begin = lambda *a, **k: plans.append(begin(*a, **k)) or plans[-1]
    spec = JobSpec("a", LowRank(r=4), AdamW(lr=1e-2))
    c.submit(spec, data(), steps=5)
    done = threading.Event()

    def device():  # slow fits: each frame takes 20 ms more
        while not done.is_set():
            if c.stopping or not c.scheduler.current("w", stream):
                return
            msg = c.scheduler.next_message("w", stream)
            if msg is None:
                time.sleep(0.05)
            if msg is not None:
                time.sleep(0.02)
                for reply in worker.handle(msg):
                    c.scheduler.receive("w", reply)
    threads = [threading.Thread(target=c.run, kwargs={"poll": 0.01}), threading.Thread(target=device)]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 60
        while c.scheduler.status("a").state != "done" and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        done.set()
        c.stop()
        for t in threads:
            t.join(10)
    assert c.scheduler.status("a").state == "done"
    assert any(p.waiting for p in plans), "no step started before its versions were in"
    trainer = Trainer(tiny("llama"), [spec])
    batches = from_map(data())
    for _ in range(5):
        trainer.step({"a": next(batches)})
    exported = adapters_of(c.scheduler.weights("a"))
    for site, a in trainer.adapters("a").items():
        assert torch.equal(exported[site].A, a.A.detach()) and torch.equal(exported[site].B, a.B.detach())


def test_an_abandoned_layered_step_keeps_its_batch_and_the_run_stays_exact():
    """A layered step that stops waiting (no fit came back in time) runs again later with the same
    batch: step t always trains on batch t, so the run is still the in-process one."""
    p = Pumped()
    p.c.layered, p.c.layer_wait = True, 0.2
    spec = JobSpec("a", LowRank(r=4), AdamW(lr=1e-2))
    p.c.submit(spec, data(), steps=4)
    taken = []
    source = p.c.data["a"]
    p.c.data["a"] = (taken.append(1) or b for b in source)
    while (msg := p.c.scheduler.next_message("w", p.stream)) is not None:
        for reply in p.worker.handle(msg):  # the assignment only
            p.c.scheduler.receive("w", reply)
    assert p.c.step_once()  # step 0: every version is in
    for _ in range(2):  # step 1 starts layered; its versions never come (no one pumps the worker)
        assert p.c.step_once()
    assert p.c.scheduler.status("a").step == 1 and len(taken) == 2  # batch 1 was taken once, kept, reused
    p.c.layered = False
    p.run()
    assert p.c.scheduler.status("a").state == "done" and len(taken) == 4
    trainer = Trainer(tiny("llama"), [spec])
    batches = from_map(data())
    for _ in range(4):
        trainer.step({"a": next(batches)})
    exported = adapters_of(p.c.scheduler.weights("a"))
    for site, a in trainer.adapters("a").items():
        assert torch.equal(exported[site].B, a.B.detach())


def test_a_job_waiting_in_a_layered_step_never_holds_up_another_job():
    """Invariant 9: while job a's step waits for versions that do not come, job b becomes ready; a's
    step gives way at once (keeping its batch) and b steps."""
    import threading
    import time

    p = Pumped()
    p.c.layered, p.c.layer_wait = True, 60.0
    p.c.submit(JobSpec("a", LowRank(r=4), AdamW(lr=1e-2)), data(), steps=4)
    while (msg := p.c.scheduler.next_message("w", p.stream)) is not None:
        for reply in p.worker.handle(msg):
            p.c.scheduler.receive("w", reply)
    assert p.c.step_once()  # a's step 0; a's step 1 will start layered and wait (nobody pumps the worker)
    threading.Timer(0.3, lambda: p.c.submit(JobSpec("b", LowRank(r=4), AdamW(lr=1e-2)), data(seed=1), steps=2)).start()
    t = time.monotonic()
    assert p.c.step_once()
    assert time.monotonic() - t < 20  # gave way, rather than waiting out layer_wait
    assert p.c.scheduler.status("a").step == 1
    assert p.c.step_once() and p.c.scheduler.status("b").step == 1  # b ran
