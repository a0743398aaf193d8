"""Invariants 5 and 8 on plain objects: whatever is lost, duplicated, delayed or crashed — workers,
their disks, the server — the run finishes and its final adapters equal the failure-free run's,
bit for bit, at S in {0, 1, 3} and I in {1, 2}. Property-based: hypothesis draws the schedules.

COLAFLOW_FAULT_EXAMPLES sets the number of schedules per (S, I) (default 150; 2000 for a soak).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colaflow import MLP, SGD, AdamW, JobSpec, LowRank
from sim import ACTIONS, Sim, reference

STEPS = 8
EXAMPLES = int(os.environ.get("COLAFLOW_FAULT_EXAMPLES", "150"))


def _spec(staleness: int, interval: int, kind: str = "lowrank", state_every: int = 1) -> JobSpec:
    adapter, opt = (LowRank(r=2), AdamW(lr=0.05)) if kind == "lowrank" else (MLP(hidden=3), SGD(lr=0.1, momentum=0.9))
    return JobSpec("j", adapter, opt, target_modules=["l1", "l2"], staleness=staleness, fit_interval=interval,
                   state_every=state_every)


@functools.cache
def _reference_of(spec_dict: str) -> dict:
    import json

    return reference(JobSpec.from_dict(json.loads(spec_dict)), STEPS)


def _reference(spec: JobSpec) -> dict:
    import json

    return _reference_of(json.dumps(spec.to_dict(), sort_keys=True))


def _assert_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for site in want:
        for name in want[site]:
            assert torch.equal(got[site][name], want[site][name]), (site, name)


schedules = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7)), min_size=20, max_size=100)


@pytest.mark.parametrize("staleness,interval", [(0, 1), (0, 2), (1, 1), (1, 2), (3, 1), (3, 2)])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, durable=st.booleans())
def test_any_schedule_of_faults_gives_the_failure_free_adapters(staleness, interval, schedule, durable):
    spec = _spec(staleness, interval)
    sim = Sim(spec, STEPS, workers=2, durable=durable)
    for action, i in schedule:
        sim.act(action, i)
    _assert_equal(sim.finish(), _reference(spec))


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None)
@given(schedule=schedules, state_every=st.sampled_from([1, 3]))
def test_faults_with_mlp_adapters_sgd_momentum_and_sparse_state(schedule, state_every):
    """Another adapter and optimizer, and learner state only every 3 fits (the server keeps more packets)."""
    spec = _spec(1, 1, "mlp", state_every)
    sim = Sim(spec, STEPS, workers=2, durable=False)
    for action, i in schedule:
        sim.act(action, i)
    _assert_equal(sim.finish(), _reference(spec))


def test_the_comparison_can_fail():
    """A different learning rate gives different adapters: the equality above is not vacuous."""
    spec = _spec(0, 1)
    other = JobSpec("j", LowRank(r=2), AdamW(lr=0.051), target_modules=["l1", "l2"])
    got = Sim(other, STEPS).finish()
    with pytest.raises(AssertionError):
        _assert_equal(got, _reference(spec))


def test_a_lost_worker_without_learner_state_moves_with_a_fresh_optimizer():
    """state_every=0 trades exact failover for fewer bytes: the run finishes, but not identically."""
    spec = _spec(0, 1, state_every=0)
    sim = Sim(spec, STEPS, workers=2, durable=False)
    while sim.sched.job("j").t < 4:
        assert sim.act("step") or sim.act("to_worker", 0) or sim.act("to_worker", 1) \
            or sim.act("to_server", 0) or sim.act("to_server", 1)
    sim.act("lose", 0)
    got = sim.finish()
    with pytest.raises(AssertionError):
        _assert_equal(got, _reference(spec))


def test_worker_loss_then_server_crash_then_the_worker_returns():
    """A fixed, nasty schedule: lose a worker mid-run, crash the server twice, crash the other."""
    spec = _spec(1, 2)
    sim = Sim(spec, STEPS, workers=2, durable=True)
    plan = ["step", "to_worker", "to_worker", "to_server", "step", "to_worker", "lose", "tick", "step",
            "server_crash", "connect", "to_worker", "to_worker", "to_server", "step", "crash", "server_crash",
            "join", "tick", "step", "dup_to_server", "dup_to_worker"]
    for action in plan:
        for i in range(2):
            sim.act(action, i)
    _assert_equal(sim.finish(), _reference(spec))


def _run_to_step(sim: Sim, t: int) -> None:
    while sim.sched.job("j").t < t:
        assert sim.act("progress")


def _owners(sim: Sim) -> set[str]:
    return {r.owner for r in sim.sched.job("j").sites.values()}


@pytest.mark.parametrize("staleness,interval", [(0, 1), (1, 2)])
def test_a_worker_that_joins_a_running_job_takes_a_share_and_changes_nothing(staleness, interval):
    spec = _spec(staleness, interval)
    sim = Sim(spec, STEPS, workers=1)
    _run_to_step(sim, 3)
    assert _owners(sim) == {"w0"}
    sim.act("join")
    assert _owners(sim) == {"w0", "w1"}  # one site each, the mover's from the durable learner state
    assert "rebalanced: 1 site moved from worker w0 to worker w1" in sim.sched.job("j").events
    _assert_equal(sim.finish(), _reference(spec))


def test_a_lost_worker_that_returns_takes_a_share_and_changes_nothing():
    """Lost with its disk (its sites move to the other), then back under its id, empty: it takes one
    site back, from the server's durable state; the run is the failure-free one, bit for bit."""
    spec = _spec(1, 1)
    sim = Sim(spec, STEPS, workers=2)
    _run_to_step(sim, 3)
    assert _owners(sim) == {"w0", "w1"}
    sim.act("lose", 0)
    sim.act("tick")
    sim.sched.ready()
    assert _owners(sim) == {"w1"}
    assert [w["state"] for w in sim.sched.workers_view() if w["worker"] == "w0"] == ["lost"]
    sim.act("tick")  # the job's last rebalance (w1 joining at the start) is a bound ago
    sim.act("rejoin", 0)
    assert _owners(sim) == {"w0", "w1"}
    events = sim.sched.job("j").events
    assert any(e.startswith("worker w0 lost") for e in events), events
    assert any(e.startswith("worker w0 returned") for e in events), events
    assert any(e.startswith("rebalanced: 1 site moved from worker w1 to worker w0") for e in events), events
    _assert_equal(sim.finish(), _reference(spec))
