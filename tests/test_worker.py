"""The worker as a plain object: replay filter, refusals, checkpoint before emit, restart, and learner
state that moves between workers exactly (also through its wire form)."""
from __future__ import annotations

import pytest
import torch

from colaflow import MLP, SGD, AdamW, JobSpec, Learner, LowRank, Packet, Schedule, Update, Worker
from colaflow.control.checkpoints import Checkpoints, MemoryCheckpoints
from colaflow.control.protocol import Ack, Assign, Packets, Refusal, SiteStart
from colaflow.sites import Site
from colaflow.wire import serde
from sim import Clock

SITE = Site("l1", "linear", 4, 6)
SPEC = JobSpec("j", LowRank(r=2), AdamW(lr=0.05, schedule=Schedule("linear", 2, 20)), target_modules=["l1"])


def packets(step: int, job: str = "j", seed: int | None = None) -> Packets:
    g = torch.Generator().manual_seed(step if seed is None else seed)
    return Packets(job, step, [Packet(job, "l1", step, 0, torch.randn(5, 4, generator=g),
                                      torch.randn(5, 6, generator=g))])


def assigned(worker: Worker, spec: JobSpec = SPEC) -> Worker:
    assert worker.handle(Assign(spec.job_id, spec, [SiteStart(SITE)])) == []
    return worker


def test_replays_are_skipped_and_a_gap_is_refused_not_raised():
    w = assigned(Worker("w"))
    (u0,) = w.handle(packets(0))
    assert w.handle(packets(0)) == []  # a replay of a step already folded in
    (refusal,) = w.handle(packets(2))  # step 1 never came
    assert isinstance(refusal, Refusal) and "packet of step 2 arrived where step 1 was due" in refusal.reason
    (u1,) = w.handle(packets(1))  # the worker is fine and goes on
    assert (u0.version, u1.version) == (1, 2)


def test_a_bad_packet_fails_its_job_only():
    other = JobSpec("k", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1"])
    w = assigned(assigned(Worker("w")), other)
    bad = packets(0)
    bad.packets[0].g[0, 0] = float("nan")
    (refusal,) = w.handle(bad)
    assert isinstance(refusal, Refusal) and "holds NaN or Inf" in refusal.reason
    (u,) = w.handle(packets(0, "k"))
    assert isinstance(u, Update) and u.job == "k"


class FullDisk(MemoryCheckpoints):
    def __init__(self):
        super().__init__()
        self.full = True

    def save(self, job, state):
        if self.full:
            raise OSError(28, "No space left on device")
        super().save(job, state)


def test_an_update_leaves_only_once_it_is_durable():
    clock, disk = Clock(), FullDisk()
    w = assigned(Worker("w", disk, clock=clock))
    assert w.handle(packets(0)) == [] and w.handle(packets(1)) == []  # fitted, held: nothing leaves
    assert not w.healthy and "No space left" in w.failure
    assert w.retry() == []  # still within its back-off
    clock.now += 60
    assert w.retry() == []  # the disk is still full
    disk.full = False
    clock.now += 60
    released = w.retry()
    assert [u.version for u in released] == [1, 2] and w.healthy and w.failure == ""
    assert disk.jobs["j"]["l1"]["state"]["meta"]["version"] == 2  # what left is on disk
    assert w.resend() == released  # not yet acknowledged
    w.handle(Ack("j", "l1", 1))
    assert [u.version for u in w.resend()] == [2]


def test_a_restarted_worker_resumes_exactly_from_its_checkpoint(tmp_path):
    steady = assigned(Worker("a"))
    crashy = assigned(Worker("b", Checkpoints(tmp_path)))
    for s in range(3):
        steady.handle(packets(s))
        crashy.handle(packets(s))
    crashy = Worker("b", Checkpoints(tmp_path))  # the process died; its state dir did not
    (p,) = crashy.hello().progress
    assert (p.version, p.fitted_through) == (3, 2)
    assert [u.version for u in crashy.resend()] == [1, 2, 3]  # none was acknowledged
    for s in range(3, 6):
        (a,) = steady.handle(packets(s))
        (b,) = crashy.handle(packets(s))
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("spec", [
    SPEC, JobSpec("j", MLP(hidden=3), SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                         schedule=Schedule("cosine", 1, 10)), target_modules=["l1"])])
def test_learner_state_moves_exactly_and_is_not_aliased(spec):
    a, b = Learner(spec, SITE), Learner(spec, SITE)
    for s in range(3):
        a.consume(packets(s).packets[0])
    state = a.state()
    frozen = {k: v.clone() for k, v in state.optimizer.tensors.items()}
    b.restore(state)
    for s in range(3, 7):
        ua, ub = a.consume(packets(s).packets[0]), b.consume(packets(s).packets[0])
        assert all(torch.equal(ua.params[k], ub.params[k]) for k in ua.params)
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
    assert all(torch.equal(v, frozen[k]) for k, v in state.optimizer.tensors.items())  # b fitted on copies


def test_learner_state_survives_its_wire_form():
    a = Learner(SPEC, SITE)
    for s in range(2):
        u = a.consume(packets(s).packets[0])
    assert u.optimizer is not None and set(u.optimizer.tensors) == {"A/exp_avg", "A/exp_avg_sq", "A/step",
                                                                    "B/exp_avg", "B/exp_avg_sq", "B/step"}
    inbox = serde.Inbox("server")
    (back,) = [m for m in (inbox.feed(raw) for raw in serde.to_server(u, 1)) if m is not None]  # as framed bytes
    b = Learner(SPEC, SITE)
    b.restore(type(a.state())(back.version, back.params, back.optimizer))
    ua, ub = a.consume(packets(2).packets[0]), b.consume(packets(2).packets[0])
    assert all(torch.equal(ua.params[k], ub.params[k]) for k in ua.params)


def test_parameters_only_restart_the_optimizer_but_keep_the_schedule():
    a, b = Learner(SPEC, SITE), Learner(SPEC, SITE)
    for s in range(4):
        a.consume(packets(s).packets[0])
    state = a.state()
    b.restore(type(state)(state.version, state.params, None))
    assert b.version == 4 and b.optimizer.state_dict()["state"] == {}
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(a.optimizer.param_groups[0]["lr"])


def test_a_foreign_optimizer_state_is_refused_clearly():
    a = Learner(SPEC, SITE)
    a.consume(packets(0).packets[0])
    state = a.state()
    sgd = JobSpec("j", LowRank(r=2), SGD(lr=0.1, momentum=0.9), target_modules=["l1"])
    state.optimizer.meta["groups"] = [{}]
    with pytest.raises(ValueError, match="does not fit a sgd optimizer"):
        Learner(sgd, SITE).restore(state)


def test_a_learner_that_breaks_on_a_state_is_refused_not_raised():
    """Whatever a learner raises (here a poisoned optimizer state), the worker answers with a Refusal."""
    a = Learner(SPEC, SITE)
    a.consume(packets(0).packets[0])
    state = a.state()
    state.optimizer.meta["groups"][0]["betas"] = "zz"  # loads, then breaks Adam at its next step
    w = Worker("w")
    w.handle(Assign("j", SPEC, [SiteStart(SITE, state)]))
    (refusal,) = w.handle(packets(1))
    assert isinstance(refusal, Refusal) and refusal.step == 1


class Counting(MemoryCheckpoints):
    def __init__(self):
        super().__init__()
        self.saves = 0

    def save(self, job, state):
        self.saves += 1
        super().save(job, state)


def test_frames_that_arrived_together_are_checkpointed_once_and_fit_the_same():
    """A step streams one frame per input group; the frames a worker has in hand are fitted in order
    and checkpointed once per job, with the updates one-by-one handling gives."""
    one, many = assigned(Worker("a", Counting())), assigned(Worker("b", Counting()))
    one.store.saves = many.store.saves = 0
    frames = [packets(s) for s in range(4)]
    singly = [u for f in frames for u in one.handle(f)]
    together = many.handle_all(frames + [Ack("j", "l1", 2)])
    assert one.store.saves == 4 and many.store.saves == 1
    assert [u.version for u in singly] == [u.version for u in together] == [1, 2, 3, 4]
    for a, b in zip(singly, together):
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert [u.version for u in many.unacked[("j", "l1")]] == [3, 4]  # the Ack came after the fits
