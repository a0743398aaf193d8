"""Work bounded before it is done (issue 22), on plain objects: an `init` export checked from its
metadata, eval sets bounded and run in the job's own share of the step loop, ended jobs that let go
of their data and are deleted by policy or by their tenant, a tenant's state-dir quota, a restart on
a full state dir, and TensorBoard writers closed when their job ends."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import msgpack
import pytest
import torch
from safetensors.torch import save as safetensors_save
from test_coordinator import Pumped, data

from colaflow import AdamW, JobSpec, LowRank
from colaflow.control import retention
from colaflow.control.retention import Policy
from colaflow.engine import evaluate
from colaflow.engine.host import Host
from colaflow.errors import ColaflowError, ResourceExhausted
from colaflow.export import FORMAT, init_params
from colaflow.models import tiny
from colaflow.server.coordinator import Coordinator
from colaflow.server.dirstore import DirStore
from colaflow.server.tblog import TensorBoardLog
from procs import examples

Q = "model.layers.0.self_attn.q_proj"


def blob(sites: list[dict], tensors: bytes, adapter: dict | None = None) -> bytes:
    meta = {"format": FORMAT, "format_version": 1, "job": {"adapter": adapter or LowRank(r=8).to_dict()},
            "sites": sites}
    return msgpack.packb({"meta": json.dumps(meta), "tensors": tensors}, use_bin_type=True)


def raw(header: dict, body: bytes = b"") -> bytes:
    """A safetensors file as its header says, whatever the bytes after it."""
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


def hostile(features: int) -> bytes:
    """The 346-byte attack: one linear site of `features` inputs, no tensor at all."""
    return blob([{"name": Q, "kind": "linear", "in_features": features, "out_features": 64}], safetensors_save({}))


# init: checked from its metadata before anything is built

def test_a_hostile_init_is_refused_from_its_metadata_before_any_tensor_is_built(monkeypatch):
    import colaflow.export

    def never(*a, **k):
        raise AssertionError("an adapter was built from a blob's own sizes")
    monkeypatch.setattr(colaflow.export, "build_adapter", never)
    c = Coordinator(Host(tiny("llama")))
    with pytest.raises(ValueError, match=r"`init` site `model\.layers\.0\.self_attn\.q_proj`: the export's is .*"
                                         r"67108864.*the job's is"):
        c.submit(JobSpec("j", LowRank(r=8), target_modules=Q.replace(".", r"\.")), data(), steps=2,
                 init=hostile(1 << 26))
    assert c.scheduler.jobs == {} and c.host.jobs == {}  # nothing hosted
    spec = JobSpec("j", LowRank(r=8))
    with pytest.raises(ValueError, match="tensors do not match the job's adapter: missing"):  # no sites to lean on
        init_params(spec, hostile(1 << 26))


def test_an_init_blob_costs_no_more_memory_than_its_own_bytes():
    """In a fresh process: before, this blob allocated 1 GiB of adapters before it was refused."""
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_bounds import hostile
        from colaflow import JobSpec, LowRank
        from colaflow.export import init_params
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            init_params(JobSpec("j", LowRank(r=8)), hostile(1 << 24))
        except ValueError:
            pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 100, out.stdout  # MiB of peak RSS


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "I64", "shape": [8, 64], "data_offsets": [0, 4096]}, "dtype 'I64'"),
    ({"dtype": "F32", "shape": [8, 65], "data_offsets": [0, 2080]}, r"shape \[8, 65\], the adapter expects \(8, 64\)"),
    ({"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 16]}, "not the 2048 its shape needs"),
    ({"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 1 << 40]}, "not the 2048 its shape needs"),
])
def test_each_init_tensor_is_checked_against_its_shape_in_the_header(entry, match):
    site = {"name": Q, "kind": "linear", "in_features": 64, "out_features": 64}
    header = {f"{Q}::A": entry, f"{Q}::B": {"dtype": "F32", "shape": [64, 8], "data_offsets": [0, 2048]}}
    with pytest.raises(ValueError, match=match):
        init_params(JobSpec("j", LowRank(r=8)), blob([site], raw(header, bytes(4096))))


@pytest.mark.parametrize("data, match", [
    (msgpack.packb([None] * 100_000), "not a packed native export"),  # containers refused before they are built
    (msgpack.packb({"meta": "x" * (5 << 20), "tensors": b""}), "not a packed native export"),
    (blob([{"name": Q, "kind": "linear", "in_features": 64, "out_features": 64}], (1 << 62).to_bytes(8, "little")),
     "header claims"),
])
def test_a_malformed_init_blob_is_refused_saying_what(data, match):
    with pytest.raises(ValueError, match=match):
        init_params(JobSpec("j", LowRank(r=8)), data)


def test_an_honest_export_seeds_a_job_on_the_server(tmp_path):
    from colaflow import Trainer
    from colaflow.data.batches import from_map
    from colaflow.export import init_blob, save

    spec = JobSpec("src", LowRank(r=4), AdamW(lr=1e-2), target_modules=["q_proj"])
    trainer = Trainer(tiny("llama"), [spec])
    batches = from_map(data())
    for _ in range(2):
        trainer.step({"src": next(batches)})
    save(trainer.adapters("src"), spec, tmp_path / "src")
    p = Pumped()
    p.c.submit(JobSpec("cont", LowRank(r=4), target_modules=["q_proj"]), data(), steps=2,
               init=init_blob(tmp_path / "src"))
    for name, a in trainer.adapters("src").items():
        got = p.c.scheduler.weights("cont").params[name]
        assert torch.equal(got["A"], a.A) and torch.equal(got["B"], a.B)


# eval: bounded, and in the job's own share of the loop

def test_an_eval_set_past_its_bounds_is_refused_at_submit():
    rows = examples(96, evaluate.MAX_EVAL_ROWS + 1, 0)
    with pytest.raises(ValueError, match=r"1025 rows .* at most 1024 rows"):
        evaluate.eval_map(eval_data=rows, every=1)
    long = [{"input_ids": [1] * 2000, "labels": [1] * 2000}] * 70
    with pytest.raises(ValueError, match=r"140000 tokens; one eval may take at most .* 131072 tokens"):
        evaluate.eval_map(eval_data=long)
    c = Coordinator(Host(tiny("llama")))
    with pytest.raises(ValueError, match="1500 rows"):  # the server refuses at submit
        c.submit(JobSpec("e", LowRank(r=2)), dict(data(), eval={"examples": examples(96, 1500, 0), "every": 1}),
                 steps=2)
    assert c.scheduler.jobs == {}


def test_an_eval_every_step_runs_in_slices_between_other_jobs_steps():
    """A job evaluating 1,024 rows each step cannot hold another tenant up: its eval runs a batch at a
    time in its own share of the loop. Before, the other job made no step while an eval ran."""
    p = Pumped()
    held = examples(96, evaluate.MAX_EVAL_ROWS, 1)
    p.c.submit(JobSpec("evals", LowRank(r=2)), dict(data(), eval={"examples": held, "every": 1}), steps=2,
               tenant="acme")
    p.c.submit(JobSpec("other", LowRank(r=2)), data(seed=2), steps=60, tenant="globex")
    p.run(rounds=2000)
    evals, other = (p.c.scheduler.job(j).metrics for j in ("evals", "other"))
    assert [("eval_loss" in m) for m in evals] == [True, True]
    before = sum(m["time"] < evals[0]["time"] for m in other)  # steps of the other job while step 0's eval ran
    assert before >= 10, (before, [m["time"] for m in other][:12], evals[0]["time"])


# ended jobs: their data goes at once; they go by policy or by their tenant

def _ended(c: Coordinator, tenant: str, *names: str) -> None:
    for name in names:
        c.submit(JobSpec(name, LowRank(r=2)), data(), steps=2, tenant=tenant, data_bytes=1000)
        c.scheduler.cancel(name)


def test_an_ended_job_lets_go_of_its_data_and_the_oldest_go_past_keep_ended(tmp_path, monkeypatch):
    c = Coordinator(Host(tiny("llama")), store=DirStore(tmp_path), policy=Policy(keep=2, max_age_s=3600))
    _ended(c, "acme", "a1", "a2", "a3")
    _ended(c, "globex", "g1")
    assert c.scheduler.job("a3").data is None and not (tmp_path / "a3" / "data.msgpack").exists()
    c.step_once()  # the loop looks at retention
    assert sorted(c.scheduler.jobs) == ["a2", "a3", "g1"]  # acme keeps 2 ended jobs; globex's are its own
    assert not (tmp_path / "a1").exists() and (tmp_path / "a2" / "job.msgpack").exists()
    later = retention.time.time() + 7200
    monkeypatch.setattr(retention.time, "time", lambda: later)
    c.scheduler._swept_at = None
    c.step_once()
    assert c.scheduler.jobs == {} and not any(p.name[0] != "." for p in tmp_path.iterdir())
    restarted = Coordinator(Host(tiny("llama")), store=DirStore(tmp_path))
    assert restarted.scheduler.jobs == {}


def test_a_tenant_deletes_its_own_ended_job_only(tmp_path):
    c = Coordinator(Host(tiny("llama")), store=DirStore(tmp_path))
    _ended(c, "acme", "mine")
    c.submit(JobSpec("live", LowRank(r=2)), data(), steps=2, tenant="acme")
    with pytest.raises(KeyError, match="unknown job 'mine'"):
        c.scheduler.delete("mine", "globex")
    with pytest.raises(ColaflowError, match="is waiting: cancel it first"):
        c.scheduler.delete("live", "acme")
    c.scheduler.delete("mine", "acme")
    with pytest.raises(KeyError):
        c.scheduler.status("mine", "acme")
    assert not (tmp_path / "mine").exists() and (tmp_path / "live").exists()


def test_a_tenant_past_its_state_dir_quota_is_refused_with_the_figure(tmp_path):
    c = Coordinator(Host(tiny("llama")), store=DirStore(tmp_path), policy=Policy(tenant_bytes=1 << 20))
    c.submit(JobSpec("small", LowRank(r=2)), data(), steps=2, tenant="acme", data_bytes=1000)
    with pytest.raises(ResourceExhausted, match=r"tenant 'acme' holds 0\.\d MiB .* this job's 2\.0 MiB would pass "
                                                r"its quota of 1\.0 MiB \(--tenant-disk-mb\)"):
        c.submit(JobSpec("big", LowRank(r=2)), data(), steps=2, tenant="acme", data_bytes=2 << 20)
    c.submit(JobSpec("theirs", LowRank(r=2)), data(), steps=2, tenant="globex", data_bytes=1000)  # not theirs


# a full state dir never stops a restart

class FullDir(DirStore):
    """A state dir on a full disk: every write fails with ENOSPC while `full`."""

    full = False

    def _check(self):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def save_job(self, *a):
        self._check()
        super().save_job(*a)

    def save_progress(self, *a):
        self._check()
        super().save_progress(*a)

    def save_metrics(self, *a, **k):
        self._check()
        super().save_metrics(*a, **k)

    def save_site(self, *a):
        self._check()
        super().save_site(*a)

    def trouble(self):
        return "no space left" if self.full else ""


def test_a_server_restarted_on_a_full_state_dir_starts_says_so_and_resumes(tmp_path):
    p = Pumped()
    p.c = Coordinator(Host(tiny("llama")), store=DirStore(tmp_path), layered=False)
    p.stream = p.c.scheduler.connect("w", p.c.scheduler.register("w", {}), p.worker.hello())
    p.c.scheduler.grant("w", p.stream, 1000)
    p.c.submit(JobSpec("j", LowRank(r=2), AdamW(lr=1e-2)), data(), steps=6)
    for _ in range(3):
        p.run(rounds=1)
    p.c.step_once()  # a step whose fit never comes back: the restart recomputes it, and drops its row
    stored = len((tmp_path / "j" / "metrics.jsonl").read_text().splitlines())
    store = FullDir(tmp_path)
    store.full = True
    p.c = Coordinator(Host(tiny("llama")), store=store, layered=False)  # restarted: it writes nothing here
    assert p.c.health().status.startswith("state dir failing")
    p.worker = type(p.worker)("w")
    p.stream = p.c.scheduler.connect("w", p.c.scheduler.register("w", {}), p.worker.hello())
    p.c.scheduler.grant("w", p.stream, 1000)
    assert not p.c.step_once() and p.c.scheduler.store_error.startswith("OSError")  # steps pause
    store.full = False
    p.c.scheduler._store_retry_at = 0.0  # past the back-off
    p.run()
    assert p.c.scheduler.status("j").state == "done" and p.c.health().status == "serving"
    rows = [json.loads(line)["step"] for line in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(6)) and stored > p.c.scheduler.job("j").metrics_saved - 6


# an ended job's TensorBoard writer is closed

class Writer:
    open = 0

    def __init__(self, path):
        Writer.open += 1

    def add_scalar(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        Writer.open -= 1


def test_tensorboard_closes_an_ended_jobs_writer_and_forgets_a_deleted_job(tmp_path):
    p = Pumped()
    tb = TensorBoardLog(tmp_path, Writer)
    for i in range(5):
        p.c.submit(JobSpec(f"j{i}", LowRank(r=2)), data(), steps=2)
        p.run()
        tb.write(p.c)
    assert Writer.open == 0 and tb.writers == {} and tb.seen == {f"j{i}": 2 for i in range(5)}
    for i in range(5):
        p.c.scheduler.delete(f"j{i}")
    tb.write(p.c)
    assert tb.seen == {} and tb.closed == set()
