"""What no tenant, worker or fault may do to the others — on plain objects, in milliseconds: take a
worker's id, see another tenant's jobs, push an absurd update, fill the server's memory or its
disk, corrupt a device's checkpoint, or stop the step loop."""
from __future__ import annotations

import logging
import resource
import subprocess
import sys

import pytest
import torch
from test_scheduler import SPEC, Rig

from colaflow import MLP, AdamW, JobSpec, LowRank, Scheduler, Update, Worker
from colaflow.control.checkpoints import Checkpoints
from colaflow.control.protocol import Packets
from colaflow.control.store import MemoryStore
from colaflow.engine.host import Host
from colaflow.errors import ResourceExhausted
from colaflow.models import tiny
from colaflow.v1 import worker_pb2
from colaflow.wire.codec import Encoded, decode
from colaflow.wire.framing import Payload, Reassembler
from procs import examples
from sim import Clock, Toy, final_params, reference, toy_loss

# identity and tenancy

def test_a_worker_id_belongs_to_the_credential_that_registered_it():
    s = Scheduler()
    session = s.register("laptop-1", {}, credential="alice")
    assert s.register("laptop-1", {}, credential="alice") == session  # the same device, again
    with pytest.raises(PermissionError, match="worker id 'laptop-1' belongs to another credential"):
        s.register("laptop-1", {}, credential="mallory")


def test_registrations_are_bounded_and_idle_ones_forgotten():
    clock = Clock()
    s = Scheduler(clock=clock, max_workers=3)
    for i in range(3):
        s.register(f"w{i}", {"accelerator": "cpu"}, credential="pool")
    with pytest.raises(ResourceExhausted, match="3 workers registered"):
        s.register("w3", {}, credential="pool")
    clock.now += 61  # registered, never connected: forgotten
    s.ready()
    assert not s.workers
    s.register("w3", {}, credential="pool")


def test_a_tenant_sees_and_acts_on_its_own_jobs_only():
    from colaflow.server.coordinator import Coordinator

    c = Coordinator(Host(tiny("llama")))
    data = {"examples": examples(96, 8, 0), "batch_size": 4}
    c.submit(JobSpec("a-job", LowRank(r=2)), data, steps=2, tenant="acme")
    c.submit(JobSpec("b-job", LowRank(r=2)), data, steps=2, tenant="globex")
    assert [s.job for s in c.scheduler.statuses("acme")] == ["a-job"]
    assert {s.job for s in c.scheduler.statuses(None)} == {"a-job", "b-job"}  # admin sees all
    for act in (lambda: c.scheduler.status("b-job", "acme"), lambda: c.scheduler.cancel("b-job", "cancelled", "acme"),
                lambda: c.scheduler.weights("b-job", "last", "acme"), lambda: c.scheduler.metrics("b-job", 0, "acme")):
        with pytest.raises(KeyError, match="unknown job 'b-job'"):  # as if it did not exist
            act()
    assert c.scheduler.status("b-job").state == "waiting"  # untouched
    assert c.health("acme").jobs == 1 and c.health(None).jobs == 2


# updates out of bounds

def test_an_absurd_update_quarantines_its_worker_and_the_job_resumes_exactly():
    """A finite 1e30 update is refused; its worker gets no more work; another worker continues from the
    last good learner state, and the final adapters are the failure-free run's."""
    rig = Rig(steps=6)
    rig.deliver()
    honest = Worker("h")
    h_stream = rig.connect("h", honest)  # it joins the running job: one of its two sites is its share

    def serve_honest():
        while (m := rig.sched.next_message("h", h_stream)) is not None:
            for reply in honest.handle(m):
                rig.sched.receive("h", reply)

    for _ in range(2):
        rig.step()
        rig.deliver()
        serve_honest()
    rig.step()
    serve_honest()
    bad = next(u for m in rig.messages() for u in rig.worker.handle(m) if isinstance(u, Update))
    bad.params["B"] = torch.full_like(bad.params["B"], 1e30)
    rig.sched.receive("w", bad)
    assert rig.sched.workers["w"].quarantined and rig.sched.job("j").sites[bad.site].received == 2
    for _ in range(200):  # drive the honest worker to the end
        moved = False
        while (m := rig.sched.next_message("h", h_stream)) is not None:
            moved = True
            for reply in honest.handle(m):
                rig.sched.receive("h", reply)
        if rig.sched.ready():
            rig.step()
        elif not moved:
            break
    job = rig.sched.job("j")
    assert job.state == "done", job.state
    assert any("quarantined" in e for m in job.metrics for e in m.get("events", []))
    want = reference(SPEC, 6)
    got = final_params(rig.sched, "j")
    assert all(torch.equal(got[s][n], want[s][n]) for s in want for n in want[s])


def test_a_learning_rate_that_blows_up_fails_its_job_not_the_honest_worker():
    """A tenant's lr = 1e5 makes absurd parameters on the first fit: the worker refuses that step (the
    job fails, saying why) instead of sending it, which once got every honest worker quarantined in
    turn (and their other tenants' jobs stalled)."""
    rig = Rig(JobSpec("j", LowRank(r=2), AdamW(lr=1e5), target_modules=["l1", "l2"]), steps=4)
    rig.deliver()
    rig.step()
    rig.deliver()
    job = rig.sched.job("j")
    assert job.state == "failed" and "is the learning rate 100000 too high?" in job.error, job.error
    assert "a parameter of magnitude" in job.error and not rig.sched.workers["w"].quarantined


# memory an attacker controls

def test_a_frame_that_declares_more_than_arrived_allocates_nothing():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="needs 1073741824 payload bytes, only 512 left"):
        Payload([b"\0" * 512]).take(1 << 30, "tensor `data_bytes`")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no 1 GiB buffer


def test_chunks_after_the_first_may_not_carry_an_envelope():
    r = Reassembler()
    r.feed(worker_pb2.Chunk(seq=1, index=0, count=2, payload_bytes=8), b"\0" * 4)
    with pytest.raises(ValueError, match="only the first has a header"):
        r.feed(worker_pb2.Chunk(seq=1, index=1, count=2, header=b"x" * 10_000), b"\0" * 4)


def test_overflowing_shapes_are_invalid_not_internal():
    with pytest.raises(ValueError, match="exceeds 2147483648 elements"):
        decode(Encoded("float32", (2 ** 32, 2 ** 32), "raw", b""))
    with pytest.raises(ValueError, match="at most 8"):
        decode(Encoded("float32", (1,) * 9, "raw", b"\0\0\0\0"))


def test_an_update_frame_is_bounded_by_what_the_jobs_adapters_need():
    from colaflow.wire import serde

    s = Scheduler()
    s.add_job(SPEC, [*Host(Toy(), toy_loss).add_job(SPEC)])
    budget = s.max_update_bytes()
    assert budget < 2 << 20  # the toy job's adapters are tiny: a few KiB, plus 1 MiB of room
    inbox = serde.Inbox("server", max_bytes=budget)
    big = worker_pb2.WorkerMessage(update=worker_pb2.Chunk(seq=1, index=0, count=64, payload_bytes=200 << 20))
    from colaflow.wire.framing import frame_message

    with pytest.raises(ValueError, match="exceeds this stream's"):
        inbox.feed(frame_message(big))


# a full disk, a corrupt checkpoint, a loop that cannot go on

class FlakyStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.full = False

    def save_progress(self, job_id, progress):
        if self.full:
            raise OSError(28, "No space left on device")
        super().save_progress(job_id, progress)

    def save_site(self, job_id, site, rec):
        if self.full:
            raise OSError(28, "No space left on device")
        super().save_site(job_id, site, rec)


def test_a_full_state_dir_pauses_steps_says_so_and_resumes_exactly(caplog):
    store = FlakyStore()
    rig = Rig(JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], staleness=1),
              steps=6, store=store)
    rig.deliver()
    rig.step()
    store.full = True
    with caplog.at_level(logging.ERROR, "colaflow.scheduler"):
        rig.step()  # S = 1: step 1 runs on version 0, but its progress cannot be stored
        with pytest.raises(OSError):  # nor the worker's update: it is not acknowledged
            rig.deliver()
    assert rig.sched.store_error.startswith("OSError") and "steps pause" in caplog.text
    assert rig.sched.ready() == []  # nothing runs while the disk is full
    store.full = False
    rig.clock.now += 60  # past the back-off: the progress is stored, the error cleared
    assert rig.sched.ready() == [] and rig.sched.store_error == ""  # it now waits for the update
    rig.stream = rig.connect("w", rig.worker)  # the refused update ended the stream: the link reconnects
    for u in rig.worker.resend():  # and resends what was not acknowledged
        rig.sched.receive("w", u)
    for _ in range(40):
        rig.deliver()
        if rig.sched.ready():
            rig.step()
    assert rig.sched.job("j").state == "done"
    want = reference(rig.spec, 6)
    got = final_params(rig.sched, "j")
    assert all(torch.equal(got[s][n], want[s][n]) for s in want for n in want[s])


def test_a_corrupt_checkpoint_is_set_aside_and_the_server_state_takes_over(tmp_path, caplog):
    from colaflow.control.protocol import Assign, SiteStart
    from colaflow.sites import Site

    site = Site("l1", "linear", 4, 6)
    spec = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1"])
    w = Worker("w", Checkpoints(tmp_path))
    w.handle(Assign("j", spec, [SiteStart(site)]))
    g = torch.Generator().manual_seed(0)
    from colaflow import Packet

    for step in range(2):
        w.handle(Packets("j", step, [Packet("j", "l1", step, 0, torch.randn(3, 4, generator=g),
                                            torch.randn(3, 6, generator=g))]))
    path = tmp_path / "j" / "l1.pt"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte deep in the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, "colaflow.worker"):
        again = Worker("w", Checkpoints(tmp_path))  # starts, rather than failing with a traceback
    assert not again.learners and "is corrupt (checksum mismatch)" in caplog.text
    assert not path.exists() and list(tmp_path.glob("j/l1.pt.corrupt-*"))


def test_a_step_loop_that_keeps_failing_gives_up_and_says_so(monkeypatch):
    from colaflow.server.coordinator import Coordinator

    c = Coordinator(Host(Toy(), toy_loss))
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(c, "step_once", lambda: 1 / 0)
    c.run(max_failures=3)  # returns instead of spinning forever
    assert "failed 3 times in a row: ZeroDivisionError" in c.fatal
    assert c.health().status.startswith("step loop failing")


def test_serving_off_loopback_needs_tls_and_tokens_or_says_insecure():
    out = subprocess.run([sys.executable, "-m", "colaflow.cli.main", "serve", "--model", "tiny-llama",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "0.0.0.0 is not a loopback address" in out.stderr
    assert "TLS (--tls-cert/--tls-key) and tokens (--tokens)" in out.stderr and "--insecure" in out.stderr


# specs a hostile tenant could send

@pytest.mark.parametrize("spec, steps, match", [
    (JobSpec("re", LowRank(r=2), target_modules=r"^([\w.]|[\w.]){0,25}!"), 4, "repeats an alternation"),
    (JobSpec("re2", LowRank(r=2), target_modules=r".*.*.*.*!"), 4, "has 4 variable repeats"),
    (JobSpec("ty", LowRank(r=2), target_modules=5), 4, "must be a list of module-name suffixes"),
    (JobSpec("big", LowRank(r=1_000_000)), 4, "would hold .* parameters, more than the frozen model's"),
    (JobSpec("fi", LowRank(r=2), fit_interval=8), 4, "`fit_interval` 8 is more than the job's 4 steps"),
    (JobSpec("fi2", LowRank(r=2), fit_interval=2**40), 2**41, "`fit_interval` 1099511627776 is over 256"),
    (JobSpec("opt", LowRank(r=2), target_modules=".?" * 30 + "!"), 4, "has 30 variable repeats"),
    (JobSpec("alt", LowRank(r=2), target_modules="(.|.)" * 30 + "!"), 4, "alternations of 1073741824 paths"),
    (JobSpec("fix", LowRank(r=2), target_modules="(?:.?){40}!"), 4, "repeats a group that itself repeats"),
    (JobSpec("fxa", LowRank(r=2), target_modules="(?:.|.){18}!"), 4, "repeats an alternation"),
    (JobSpec("atom", LowRank(r=2), target_modules="(?>" + ".?" * 20 + "!)"), 4, "uses atomic_group"),
    (JobSpec("cond", LowRank(r=2), target_modules="()(?(1)" + ".?" * 20 + "!|x)"), 4, "uses groupref_exists"),
    (JobSpec("st", LowRank(r=2), staleness=10**9), 10**10, "`staleness` 1000000000 is over 256"),
    (JobSpec("se", LowRank(r=2), state_every=10**9), 10**10, "`state_every` 1000000000 is over 256"),
    (JobSpec("fs", LowRank(r=2), fit_interval=64, state_every=8), 10**4, "`fit_interval x state_every` 512"),
])
def test_a_spec_that_would_stall_or_exhaust_the_server_is_refused_at_submit(spec, steps, match):
    """Each once got through: a backtracking regex held the server (its GIL) for minutes, r = 4e6
    took gigabytes, a fit interval past the steps, or a huge staleness or `state_every`, kept every
    step's packets or versions for ever."""
    from colaflow.server.coordinator import Coordinator

    c = Coordinator(Host(tiny("llama")))
    with pytest.raises(ValueError, match=match):
        c.submit(spec, {"examples": examples(96, 8, 0), "batch_size": 4}, steps=steps)
    assert not c.scheduler.jobs and not c.host.jobs
    with pytest.raises(ValueError, match=r"`layers` must be an int in \[2, 16\]"):  # cheap in parameters, not in time
        MLP(hidden=1, layers=100_000)
    from colaflow import AdaLink

    with pytest.raises(ValueError, match="`token_types` has 254 ranges; at most 16"):  # a masked pass per type
        AdaLink(r=1, token_types=[(i, i + 1) for i in range(254)])


def test_a_tenant_holds_at_most_its_share_of_live_jobs():
    from colaflow.server.coordinator import Coordinator

    c = Coordinator(Host(tiny("llama")), max_tenant_jobs=2)
    data = {"examples": examples(96, 8, 0), "batch_size": 4}
    for j in ("a1", "a2"):
        c.submit(JobSpec(j, LowRank(r=2)), data, steps=4, tenant="acme")
    with pytest.raises(ResourceExhausted, match="tenant 'acme' has 2 live jobs, the server's limit"):
        c.submit(JobSpec("a3", LowRank(r=2)), data, steps=4, tenant="acme")
    c.submit(JobSpec("b1", LowRank(r=2)), data, steps=4, tenant="globex")  # another tenant is not held up
    c.scheduler.cancel("a1")
    c.submit(JobSpec("a3", LowRank(r=2)), data, steps=4, tenant="acme")  # an ended job frees its place


def test_an_optimizer_no_worker_can_build_is_refused_and_a_worker_refuses_one_it_cannot():
    """A schedule that is not a map once passed the server and broke every worker's stream in a loop."""
    from colaflow.control.protocol import Refusal

    with pytest.raises(ValueError, match="`schedule` must be a map"):
        AdamW(lr=1e-3, schedule=[1, 2])
    with pytest.raises(ValueError, match="bad `schedule`"):
        AdamW(lr=1e-3, schedule={"kind": "linear", "steps": 3})
    rig = Rig(steps=4)
    bad = JobSpec("bad", LowRank(r=2), AdamW(lr=1e-3), target_modules=["l1", "l2"])
    object.__setattr__(bad.optimizer, "schedule", [1, 2])  # past the checks, as a peer of another version might
    with pytest.raises(ValueError, match="its optimizer cannot be built"):
        rig.sched.add_job(bad, rig.host.add_job(bad), 4)
    from colaflow.control.protocol import Assign, SiteStart

    out = rig.worker.handle(Assign("bad", bad, [SiteStart(next(iter(rig.host.jobs["bad"].sites.values())), None)]))
    assert len(out) == 1 and isinstance(out[0], Refusal) and "cannot build its learner" in out[0].reason
