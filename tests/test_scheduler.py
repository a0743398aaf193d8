"""The scheduler as a plain object: deterministic staleness, what it accepts and refuses, when sites
move, what it keeps, and how it comes back from its store. Milliseconds, no transport, no threads."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from colaflow import AdamW, JobSpec, LowRank, Scheduler, Update, Worker
from colaflow.control.protocol import Ack, Assign, Refusal, Revoke
from colaflow.control.store import MemoryStore
from colaflow.data.batches import collate
from colaflow.engine.host import Host
from sim import Clock, Toy, final_params, reference, toy_batches, toy_loss

SPEC = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"])


class Rig:
    """A scheduler, a host on the toy model, and one in-process worker with hand-driven delivery."""

    def __init__(self, spec: JobSpec = SPEC, steps: int | None = 8, store=None, reassign_after: float = 10.0):
        self.clock = Clock()
        self.host = Host(Toy(), toy_loss)
        self.sched = Scheduler(store, reassign_after, self.clock)
        self.spec = spec
        self.batches = toy_batches(16)
        self.sched.add_job(spec, self.host.add_job(spec), steps)
        self.worker = Worker("w")
        self.stream = self.connect("w", self.worker)

    def connect(self, name: str, worker: Worker) -> int:
        stream = self.sched.connect(name, self.sched.register(name), worker.hello())
        self.sched.grant(name, stream, 1000)
        return stream

    def step(self) -> int:
        plan = self.sched.begin(self.spec.job_id, held=self.host.versions(self.spec.job_id))
        for u in plan.apply:
            self.host.apply(u)
        result = self.host.step(collate([(plan.job, self.batches[plan.step])]), steps={plan.job: plan.step})
        self.sched.finish(plan, result.packets, result.losses[plan.job], result.tokens[plan.job])
        return plan.need

    def messages(self, name: str = "w", stream: int | None = None) -> list:
        out = []
        while (m := self.sched.next_message(name, self.stream if stream is None else stream)) is not None:
            out.append(m)
        return out

    def deliver(self) -> list[Update]:
        """Everything to the worker; its updates back to the scheduler; returns those updates."""
        updates = []
        for m in self.messages():
            for reply in self.worker.handle(m):
                updates.append(reply)
                self.sched.receive("w", reply)
        return updates


def test_a_step_uses_exactly_need_t_even_when_newer_versions_arrived():
    """S = 2, I = 1: updates arrive at once, yet step t runs on version max(0, t - 2), never newer."""
    rig = Rig(JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], staleness=2))
    rig.deliver()
    used = []
    for _ in range(6):
        used.append(rig.step())
        rig.deliver()
        assert all(r.received == rig.sched.job("j").t for r in rig.sched.job("j").sites.values())  # early arrivals
    assert used == [0, 0, 0, 1, 2, 3]
    assert set(rig.host.jobs["j"].versions.values()) == {3}


def test_a_job_waits_for_the_versions_it_needs():
    rig = Rig()
    rig.deliver()
    rig.step()
    assert rig.sched.ready() == []  # S = 0: step 1 needs version 1 of every site
    with pytest.raises(RuntimeError, match="cannot run step 1: it needs version 1"):
        rig.sched.begin("j")
    rig.deliver()
    assert rig.sched.ready() == ["j"]


def test_replays_are_acknowledged_and_change_nothing_and_gaps_are_refused():
    rig = Rig()
    rig.deliver()
    rig.step()
    (u1, u2) = rig.deliver()
    site = rig.sched.job("j").sites[u1.site]
    forged = Update(u1.job, u1.site, 1, {k: torch.ones_like(v) for k, v in u1.params.items()}, 0.0, 0, u1.optimizer)
    rig.sched.receive("w", forged)
    assert torch.equal(site.versions[1]["A"], u1.params["A"])  # the replayed version keeps its first value
    assert rig.messages()[-1] == Ack("j", u1.site, 1)
    with pytest.raises(ValueError, match="has version 3; expected 2"):
        rig.sched.receive("w", Update("j", u1.site, 3, u1.params, 0.0, 2, u1.optimizer))
    with pytest.raises(ValueError, match="fitted through step 5; expected 1"):
        rig.sched.receive("w", Update("j", u1.site, 2, u1.params, 0.0, 5, u1.optimizer))


@pytest.mark.parametrize("bad,match", [
    (lambda u: {"A": u.params["A"]}, "adapter parameters \\['A'\\] do not match"),
    (lambda u: {"A": u.params["A"], "B": torch.zeros(3, 3)}, "parameter `B` has shape \\(3, 3\\)"),
    (lambda u: {"A": u.params["A"], "B": torch.full_like(u.params["B"], float("nan"))}, "non-finite"),
])
def test_bad_parameters_are_refused_and_nothing_is_stored(bad, match):
    """The update fails its job, with why; nothing is stored, and the worker is told to drop the site
    (before, the stream ended and the worker resent the update on every reconnect, for ever)."""
    rig = Rig()
    rig.deliver()
    rig.step()
    u = next(r for r in rig.worker.handle(rig.messages()[0]) if isinstance(r, Update))
    rig.sched.receive("w", Update(u.job, u.site, u.version, bad(u), 0.0, u.fitted_through, u.optimizer))
    job = rig.sched.job("j")
    assert job.state == "failed" and re.search("worker w sent an update it cannot have fitted: .*" + match, job.error)
    assert job.sites[u.site].received == 0 and not rig.sched.workers["w"].quarantined
    assert any(isinstance(m, Revoke) and u.site in m.sites for m in rig.messages())


def test_learner_state_is_required_every_state_every_fits_and_checked():
    rig = Rig()
    rig.deliver()
    rig.step()
    u = next(r for r in rig.worker.handle(rig.messages()[0]) if isinstance(r, Update))
    rig.sched.receive("w", Update(u.job, u.site, 1, u.params, 0.0, 0, None))
    assert "lacks the learner state" in rig.sched.job("j").error
    rig = Rig()
    rig.deliver()
    rig.step()
    u = next(r for r in rig.worker.handle(rig.messages()[0]) if isinstance(r, Update))
    bad = type(u.optimizer)({**u.optimizer.tensors, "A/exp_avg": torch.zeros(7)}, u.optimizer.meta)
    rig.sched.receive("w", Update(u.job, u.site, 1, u.params, 0.0, 0, bad))
    assert "optimizer tensor `A/exp_avg` of shape (7,)" in rig.sched.job("j").error


def test_foreign_updates_are_refused_but_a_past_owner_is_only_revoked():
    rig = Rig()
    rig.deliver()
    rig.step()
    updates = [r for r in rig.worker.handle(rig.messages()[0]) if isinstance(r, Update)]
    stranger = Worker("x")
    rig.connect("x", stranger)  # it takes a share of the running job: one of its two sites
    u = next(u for u in updates if rig.sched.job("j").sites[u.site].owner == "w")
    with pytest.raises(PermissionError, match="not assigned site"):
        rig.sched.receive("x", u)
    with pytest.raises(PermissionError, match="not assigned site"):  # unknown jobs read the same
        rig.sched.receive("x", Update("nope", u.site, 1, u.params, 0.0, 0))
    rig.sched.cancel("j")
    rig.sched.receive("w", u)  # in flight when the job was cancelled: a normal event
    assert isinstance(rig.messages()[-1], Revoke)


def test_a_lost_worker_sites_move_once_with_its_learner_state(caplog):
    rig = Rig()
    rig.deliver()
    for _ in range(3):
        rig.step()
        rig.deliver()
    spare = Worker("spare")
    spare_stream = rig.connect("spare", spare)
    rig.sched.disconnect("w", rig.stream)
    rig.clock.now += 9.9
    rig.sched.ready()
    assert rig.sched.job("j").sites["l2"].owner == "w"  # not gone yet: it may come back (l1: the spare's share)
    rig.clock.now += 0.2
    with caplog.at_level(logging.WARNING, "colaflow.scheduler"):
        for _ in range(50):
            rig.sched.ready()
    assert sum("lost (no word" in r.message for r in caplog.records) == 1  # said once, not forty times a second
    assert {w["worker"]: w["state"] for w in rig.sched.workers_view()}["w"] == "lost"  # shown, not forgotten
    assigns = rig.messages("spare", spare_stream)  # its share when it joined, then the lost worker's site
    assert {s.site.name for a in assigns for s in a.sites} == {"l1", "l2"}
    assert all(isinstance(a, Assign) for a in assigns)
    assert all(s.state.version == 3 and s.state.optimizer for a in assigns for s in a.sites)
    events = rig.sched.job("j").events
    assert "worker spare joined" in events and any(e.startswith("worker w lost") for e in events)


def test_a_worker_connected_but_silent_counts_as_gone_and_its_sites_move():
    """A stopped (SIGSTOP) or hung worker keeps its stream open: once nothing (no frame, no heartbeat)
    came from it for `reassign_after` seconds (at least 10), its sites move as a lost worker's do; one
    heard from stays."""
    rig = Rig()
    rig.deliver()
    rig.step()
    rig.deliver()
    spare = Worker("spare")
    spare_stream = rig.connect("spare", spare)
    rig.sched.workers["w"].last_seen = rig.clock.now  # as the server's frames and heartbeats set it
    for _ in range(11):
        rig.clock.now += 1.0
        rig.sched.workers["spare"].last_seen = rig.clock.now  # the spare keeps beating; w is silent
        rig.sched.ready()
        if rig.clock.now < 10.0:
            assert rig.sched.job("j").sites["l2"].owner == "w"  # (l1 went to the spare when it joined)
    assert rig.sched.workers["w"].lost_at is not None
    assert {r.owner for r in rig.sched.job("j").sites.values()} == {"spare"}
    assert not rig.sched.current("w", rig.stream)  # its stream ends; if it wakes, it connects anew
    assigns = rig.messages("spare", spare_stream)
    assert all(isinstance(a, Assign) for a in assigns) and all(s.state.version == 1 for a in assigns for s in a.sites)


def test_a_worker_that_beats_but_never_fits_loses_the_sites_it_holds_up():
    """Connected, heartbeating, taking packets, sending no fit: after `fit_timeout` (300 s at least)
    the sites the job waits for move, from the last durable state, and the job says why; it then
    finishes with the failure-free run's adapters, bit for bit."""
    rig = Rig()
    rig.deliver()
    rig.step()
    rig.deliver()
    rig.step()
    rig.messages()  # w takes step 1's packets and fits nothing
    spare = Worker("spare")
    spare_stream = rig.connect("spare", spare)
    job = rig.sched.job("j")
    assert job.sites["l1"].owner == "w"  # not before it has stayed connected `settle_after`
    rig.clock.now += rig.sched.settle_after
    assert rig.sched.ready() == []  # settled: it takes a share, l1, from the durable state
    assert job.sites["l1"].owner == "spare" and job.sites["l2"].owner == "w"

    def serve_spare():
        for m in rig.messages("spare", spare_stream):
            for reply in spare.handle(m):
                rig.sched.receive("spare", reply)

    for _ in range(30):  # 10 .. 300 s: it waits for w's fit of l2 (the spare fits l1 at once, at 10 s)
        serve_spare()
        assert rig.sched.ready() == [] and job.sites["l2"].owner == "w"
        rig.clock.now += 10.0
    rig.sched.ready()  # 310 s: 300 s since the spare's fit, the job's last progress
    assert {r.owner for r in job.sites.values()} == {"spare"}
    assert any(isinstance(m, Revoke) and "sent no fit of 1 site" in m.reason for m in rig.messages())
    assert any("sent no fit" in e for e in job.events)
    msgs = rig.messages("spare", spare_stream)
    assert isinstance(msgs[0], Assign) and all(s.state.version == 1 for s in msgs[0].sites)
    for _ in range(200):  # the spare runs the job to its end
        for m in msgs:
            for reply in spare.handle(m):
                rig.sched.receive("spare", reply)
        if rig.sched.ready():
            rig.step()
        msgs = rig.messages("spare", spare_stream)
        if not msgs and job.state != "running":
            break
    assert job.state == "done"
    want, got = reference(SPEC, 8), final_params(rig.sched, "j")
    assert all(torch.equal(got[s][n], want[s][n]) for s in want for n in want[s])


def test_a_worker_takes_a_share_only_once_it_has_stayed_connected_settle_after():
    """A worker that connects and drops within `settle_after` (a flaky link, a confused client)
    never takes a running job's sites, so it cannot stall the job; one that stays takes its share."""
    rig = Rig()
    rig.deliver()
    rig.step()
    job = rig.sched.job("j")
    for i in range(3):  # three that come and go at once
        name = f"flaky{i}"
        stream = rig.connect(name, Worker(name))
        rig.clock.now += rig.sched.settle_after / 2
        rig.sched.ready()
        rig.sched.disconnect(name, stream)
        assert {r.owner for r in job.sites.values()} == {"w"}
        assert not any(isinstance(m, Assign) for m in rig.messages(name, stream))
    rig.connect("stays", Worker("stays"))
    rig.clock.now += rig.sched.settle_after / 2
    rig.sched.ready()
    assert {r.owner for r in job.sites.values()} == {"w"}
    rig.clock.now += rig.sched.settle_after / 2
    rig.sched.ready()
    assert {r.owner for r in job.sites.values()} == {"w", "stays"}
    assert any("rebalanced: 1 site moved from worker w to worker stays" in e for e in job.events)


def test_a_returning_worker_takes_its_sites_back_at_once_even_from_a_worker_still_settling():
    """Settling holds back the taker, never the giver: a worker that comes back holding learners takes
    its share at once, though the worker that holds its sites now has itself just reconnected (before,
    nothing moved until the giver had settled, and the returning daemon sat idle)."""
    rig = Rig()
    rig.deliver()
    rig.step()
    rig.deliver()
    x = Worker("x")
    xs = rig.connect("x", x)

    def deliver_x():
        for m in rig.messages("x", xs):
            for reply in x.handle(m):
                rig.sched.receive("x", reply)

    rig.clock.now += rig.sched.settle_after + 0.1
    rig.sched.ready()
    deliver_x()
    job = rig.sched.job("j")
    mine = {n for n, r in job.sites.items() if r.owner == "x"}
    assert len(mine) == 1  # its share, once settled
    rig.step()
    rig.deliver()
    deliver_x()
    rig.sched.disconnect("x", xs)
    rig.clock.now += rig.sched.rebalance_after + 0.1  # x is lost; its site goes back to w
    rig.sched.ready()
    assert {r.owner for r in job.sites.values()} == {"w"}
    rig.sched.disconnect("w", rig.stream)  # w reconnects: it is settling again
    rig.stream = rig.connect("w", rig.worker)
    rig.deliver()
    xs = rig.connect("x", x)  # x comes back holding its learner
    assert {n for n, r in job.sites.items() if r.owner == "x"} == mine
    assert rig.sched.workers["w"].connected  # nothing lost on the giver


def test_packets_are_kept_until_durable_state_covers_them():
    spec = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], state_every=3)
    rig = Rig(spec)
    rig.deliver()
    kept = []
    for _ in range(5):
        rig.step()
        rig.deliver()
        kept.append(list(rig.sched.job("j").sites["l1"].retained))
    # the learner state rides with version 3 (the fit of step 2): it covers steps 0-2; the packets
    # of later steps stay until version 6 brings the next one
    assert kept == [[0], [0, 1], [], [3], [3, 4]]


def test_a_cancel_while_a_step_runs_is_harmless():
    rig = Rig()
    rig.deliver()
    plan = rig.sched.begin("j")
    result = rig.host.step(collate([("j", rig.batches[0])]))
    rig.sched.cancel("j")
    rig.sched.finish(plan, result.packets, result.losses["j"], result.tokens["j"])  # no KeyError: ignored
    assert rig.sched.job("j").state == "cancelled" and rig.sched.take_ended() == ["j"]


def test_a_refusal_fails_only_its_job_with_the_reason():
    rig = Rig()
    rig.deliver()
    rig.sched.receive("w", Refusal("j", "l1", 0, "gradient `g` holds NaN"))
    job = rig.sched.job("j")
    assert job.state == "failed" and "worker w refused step 0 of site `l1`: gradient `g` holds NaN" in job.error


@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_restart_from_the_store_resumes_at_the_first_step_not_covered(kind, tmp_path):
    from colaflow.server.dirstore import DirStore

    store = MemoryStore() if kind == "memory" else DirStore(tmp_path)
    rig = Rig(JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], staleness=1,
                      fit_interval=2), store=store)
    rig.deliver()
    for _ in range(5):
        rig.step()
        rig.deliver()
    before = rig.sched.job("j")
    assert before.t == 5 and before.sites["l1"].received == 2
    again = Scheduler(DirStore(tmp_path) if kind == "dir" else store, 10.0, rig.clock)
    job = again.job("j")
    assert job.state == "waiting" and job.t == 4  # version 2 covers steps 0-3
    assert job.sites["l1"].owner == "w" and set(job.sites["l1"].versions) >= {1, 2}
    assert job.need(job.t) == 1  # step 4 runs on version 1, which the store kept
    for name, rec in before.sites.items():  # what came back is what was stored, bit for bit
        back = job.sites[name]
        assert back.received == rec.received and back.state.version == rec.state.version
        assert all(torch.equal(back.versions[v][k], rec.versions[v][k]) for v in rec.versions for k in rec.versions[v])
        assert all(torch.equal(back.state.optimizer.tensors[k], t) for k, t in rec.state.optimizer.tensors.items())
        assert _jsonish(back.state.optimizer.meta) == _jsonish(rec.state.optimizer.meta)
    # the metrics history survives, up to the restart step (steps 4 on run again and report anew)
    assert job.metrics == _jsonish(before.metrics[:4]) and job.losses == before.losses[:4]
    assert job.max_staleness == max(m["staleness"] for m in before.metrics[:4])
    third = Scheduler(DirStore(tmp_path) if kind == "dir" else store, 10.0, rig.clock).job("j")
    assert third.metrics == job.metrics  # the rows of the steps to run again were dropped from the store


def test_a_torn_metrics_line_loses_only_itself(tmp_path):
    """A crash or a full disk mid-append tears the last row; the rows appended after it stay readable."""
    from colaflow.server.dirstore import DirStore

    store = DirStore(tmp_path)
    (tmp_path / "j").mkdir()
    store.save_metrics("j", [{"step": 0, "loss": 1.0}])
    with open(tmp_path / "j" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1, "lo')
    store.save_metrics("j", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}])
    from colaflow.server.dirstore import _load_metrics

    assert [r["step"] for r in _load_metrics(tmp_path / "j" / "metrics.jsonl")] == [0, 1, 2]


def test_a_step_run_again_after_a_restart_is_not_counted_stale():
    """S = 0: a restart reruns steps whose fits already made newer versions; those steps still used
    the newest version that could exist before them, so their staleness is 0, as in the first run."""
    store = MemoryStore()
    rig = Rig(JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], state_every=2), store=store)
    rig.deliver()
    for _ in range(3):
        rig.step()
        rig.deliver()
    rig.sched = Scheduler(store, 10.0, rig.clock)  # the server restarts; the worker comes back
    rig.stream = rig.connect("w", rig.worker)
    job = rig.sched.job("j")
    assert job.t == 2 and max(r.received for r in job.sites.values()) == 3  # version 3 exists already
    for _ in range(2):
        rig.step()
        rig.deliver()
    assert [m["step"] for m in job.metrics] == [0, 1, 2, 3] and job.max_staleness == 0


def _jsonish(meta):
    """Tuples become lists in a stored map (JSON or msgpack); the optimizer takes either."""
    import json

    return json.loads(json.dumps(meta))


def test_done_jobs_keep_only_their_final_version_and_tell_the_driver():
    rig = Rig(steps=3)
    rig.deliver()
    for _ in range(3):
        rig.step()
        rig.deliver()
    assert rig.sched.ready() == []
    job = rig.sched.job("j")
    assert job.state == "done" and rig.sched.take_ended() == ["j"]
    assert all(list(r.versions) == [3] and not r.retained and r.owner is None for r in job.sites.values())
    params = rig.sched.weights("j").params
    assert torch.equal(params["l1"]["A"], rig.worker.learners[("j", "l1")].adapter.A)


def test_the_trainer_can_flush_mid_run_and_go_on():
    """flush() loads the newest versions into the host; the next step still runs on need(t), even 0."""
    from colaflow import Trainer

    spec = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], staleness=3)
    a, b = Trainer(Toy(), [spec], loss_fn=toy_loss), Trainer(Toy(), [spec], loss_fn=toy_loss)
    for i, batch in enumerate(toy_batches(6)):
        a.step({"j": batch})
        b.step({"j": batch})
        if i == 1:
            b.flush()
    for site, adapter in a.adapters("j").items():
        assert torch.equal(adapter.A, b.adapters("j")[site].A)


@pytest.mark.parametrize("poison,match", [
    (lambda m: m["groups"][0].__setitem__("betas", "zz"), "optimizer `groups`\\[0\\] `betas` is 'zz'"),
    (lambda m: m["groups"][0].__setitem__("lr", float("nan")), "`lr` is nan"),
    (lambda m: m["groups"][0].__setitem__("params", [1, 0]), "`params` is \\[1, 0\\]"),
    (lambda m: m["schedule"].pop("last_epoch"), "optimizer `schedule` is"),
    (lambda m: m["values"].__setitem__("A/evil", {"x": 1}), "optimizer value `A/evil`"),
])
def test_a_learner_state_another_worker_could_not_load_is_refused(poison, match):
    """The server keeps learner states to hand them to other workers: each must look like a fresh one's."""
    rig = Rig()
    rig.deliver()
    rig.step()
    u = next(r for r in rig.worker.handle(rig.messages()[0]) if isinstance(r, Update))
    poison(u.optimizer.meta)
    rig.sched.receive("w", u)  # its job fails, with why
    job = rig.sched.job("j")
    assert job.state == "failed" and re.search(match, job.error) and job.sites[u.site].received == 0


def test_a_refusal_for_someone_elses_site_is_refused_and_a_second_stream_is_noted(caplog):
    rig = Rig()
    rig.connect("x", Worker("x"))  # it takes one of the job's two sites: not the other
    other = next(n for n, r in rig.sched.job("j").sites.items() if r.owner == "w")
    with pytest.raises(PermissionError, match=f"not assigned site `{other}` of job 'j'"):
        rig.sched.receive("x", Refusal("j", other, 0, "forged"))
    assert rig.sched.job("j").state != "failed"
    with caplog.at_level(logging.WARNING, "colaflow.scheduler"):
        rig.connect("w", Worker("w"))  # a second process with the same id
    assert "two workers with one id?" in caplog.text
