"""Job files, continuing from an export, and readable status from Python — all in process (fast)."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import rel_err

import colaflow
from colaflow import SGD, AdamW, LowRank, Session
from colaflow.errors import InvalidArgument
from colaflow.export import load
from colaflow.wire.client import JobInfo
from procs import examples

ROWS = examples(96, 6, seed=5)


def params(job, path) -> dict:
    _, adapters = load(job.export(path, format="native"))
    return {s: {n: p.detach().clone() for n, p in a.named_parameters()} for s, a in adapters.items()}


def test_a_job_file_maps_onto_session_submit(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "job.yaml"
    f.write_text("id: yaml-job\nsteps: 3\nbatch_size: 2\ntargets: [q_proj]\nstaleness: 1\n"
                 "adapter: {kind: lowrank, r: 4, alpha: 16}\n"
                 "optimizer: {kind: adamw, lr: 1e-2, betas: [0.8, 0.9],\n"
                 "            schedule: {kind: linear, warmup: 1, total: 3}}\n"
                 "data: rows.jsonl\ninit: ../exported\n")
    kw = colaflow.load_job(f)
    assert kw["job_id"] == "yaml-job" and kw["steps"] == 3 and kw["targets"] == ["q_proj"] and kw["staleness"] == 1
    assert kw["adapter"] == LowRank(r=4, alpha=16)
    assert isinstance(kw["optimizer"], AdamW) and kw["optimizer"].betas == (0.8, 0.9)
    assert kw["optimizer"].lr == 0.01  # `1e-2` is a number, as YAML 1.2 has it (PyYAML alone: a string)
    assert kw["optimizer"].schedule.kind == "linear" and kw["optimizer"].schedule.total == 3
    assert kw["examples"] == str(tmp_path / "sub" / "rows.jsonl")  # relative to the file, handed on as a path
    assert kw["init"] == str(tmp_path / "exported")

    f.write_text(f"id: inline\nsteps: 2\nbatch_size: 2\nadapter: {{kind: lowrank, r: 2}}\ndata: {ROWS!r}\n")
    with Session("tiny-llama") as s:  # the same file from Python
        job = s.submit(**colaflow.load_job(f))
        assert job.wait(progress=False)["state"] == "done"


@pytest.mark.parametrize("text, error", [
    ("steps: 2\ndata: []\nepochs: 3\n", "unknown key 'epochs'; known: .*batch_size.*data.*steps"),
    ("steps: 2\ndata: []\nadapter: {kind: lora}\n", "unknown adapter `kind` 'lora'; known: .*lowrank"),
    ("steps: 2\ndata: []\noptimizer: {kind: adamw, lr: 1.0e-3, warmup: 3}\n", "bad adamw optimizer spec.*warmup"),
    ("steps: 2\n", "no `data`"),
    ("data: []\n", "no `steps`"),
    ("id: a\njob_id: b\nsteps: 1\ndata: []\n", "`id` and `job_id` are the same key"),
    ("- 1\n- 2\n", "a job file is a map"),
    ("steps: [1\n", "not valid YAML"),
    ("steps: 2\ndata: []\noptimizer: {kind: adamw, lr: '1e-3'}\n", "`lr` must be a number, got str '1e-3'"),
    ("steps: 2\ndata: []\noptimizer: {kind: sgd, lr: .inf}\n", "`lr` must be finite"),
    ("steps: 2\ndata: []\noptimizer: {kind: adamw, betas: [0.9, 1.5]}\n", "`betas` must be two numbers in"),
    ("steps: 2\ndata: []\nadapter: {kind: lowrank, dropout: yes}\n", "`dropout` must be a number, got bool"),
])
def test_a_bad_job_file_says_what_is_wrong(tmp_path, text, error):
    f = tmp_path / "job.yaml"
    f.write_text(text)
    with pytest.raises(InvalidArgument, match=error):
        colaflow.load_job(f)


def test_continuing_from_an_export_equals_training_on(tmp_path):
    """M steps, export, N more steps from the export == M + N steps in one job (SGD without momentum:
    no optimizer state to lose; an export carries none, so an AdamW run restarts its moments)."""
    M, N = 3, 3
    kw = dict(batch_size=len(ROWS), adapter=LowRank(r=4), optimizer=SGD(lr=0.5), targets=["q_proj", "v_proj"])
    with Session("tiny-llama") as s:
        first = s.submit(ROWS, steps=M, job_id="first", **kw)
        first.wait(progress=False)
        first.export(tmp_path / "first", format="native")
        whole = s.submit(ROWS, steps=M + N, job_id="whole", **kw)
        whole.wait(progress=False)
        kw.pop("adapter")  # taken from the export
        cont = s.submit(ROWS, steps=N, job_id="cont", init=tmp_path / "first", **kw)
        cont.wait(progress=False)
        want, got, start = params(whole, tmp_path / "w"), params(cont, tmp_path / "c"), params(first, tmp_path / "f")
    assert set(got) == set(want) and len(got) == 4
    err = max(rel_err(got[s][n], want[s][n]) for s in want for n in want[s])
    moved = min(rel_err(got[s]["B"], start[s]["B"]) for s in want)
    print(f"continued vs whole run: max relative error {err:.1e}; moved from the export by >= {moved:.2f}")
    assert err < 1e-5 and moved > 0.01


def test_an_export_that_does_not_fit_the_job_is_refused(tmp_path):
    with Session("tiny-llama") as s:
        job = s.submit(ROWS, steps=1, batch_size=2, adapter=LowRank(r=4), targets=["q_proj"], job_id="src")
        job.wait(progress=False)
        job.export(tmp_path / "src", format="native")
        job.export(tmp_path / "peft", format="peft")
        with pytest.raises(InvalidArgument, match=r"export's adapter is .*'r': 4.*the job's is .*'r': 8"):
            s.submit(ROWS, steps=1, batch_size=2, adapter=LowRank(r=8), targets=["q_proj"], init=tmp_path / "src")
        with pytest.raises(InvalidArgument, match=r"sites do not match.*missing \[.*v_proj"):
            s.submit(ROWS, steps=1, batch_size=2, targets=["q_proj", "v_proj"], init=tmp_path / "src")
        with pytest.raises(InvalidArgument, match="not a native colaflow export"):
            s.submit(ROWS, steps=1, batch_size=2, init=tmp_path / "peft")
        assert [j.id for j in s.jobs()] == ["src"]  # nothing half-made stays behind


def test_status_is_plain_and_metrics_say_how_the_job_ended(capsys):
    with Session("tiny-llama") as s:
        job = s.submit(ROWS, steps=4, batch_size=2, adapter=LowRank(r=2), job_id="readable")
        assert job.metrics().ended is None and job.status()["workers"] == ["local"]  # the in-process worker
        job.wait(progress=True)
        bar = capsys.readouterr().err
        assert re.search(r"4/4 \[\d\d:\d\d<\d\d:\d\d", bar), bar  # tqdm's ETA: elapsed<remaining
        m = job.metrics()
        assert len(m) == 4 and m.ended == "done" and m.error == ""
        status = job.status()
        assert status["workers"] == []  # an ended job's sites are released
        info = JobInfo(**{k: status[k] for k in ("job", "state", "step", "steps", "loss", "error", "max_staleness")},
                       workers=["edge1"], versions={"model.layers.0.self_attn.q_proj": 4})
        assert repr(info) == (f"JobInfo(job='readable', state='done', step=4/4, loss={status['loss']:.4f}, "
                              "workers=['edge1'])")
        other = s.submit(ROWS, steps=5, batch_size=2, adapter=LowRank(r=2), job_id="stopped")
        other.cancel()
        m = other.metrics()
        assert m.ended == "cancelled" and m.error == "cancelled"


def test_a_restarted_server_keeps_a_jobs_starting_weights(tmp_path):
    """`init` is stored with the job: after a restart, version 0 is still the export's, not the seeded init."""
    from colaflow import JobSpec, Scheduler
    from colaflow.control.store import MemoryStore
    from colaflow.engine.host import Host
    from colaflow.models import tiny

    spec = JobSpec("kept", LowRank(r=2))
    sites = Host(tiny("llama")).add_job(spec)
    init = {s.name: {"A": torch.full((2, s.in_features), 0.5),
                     "B": torch.full((s.out_features, 2), 0.25)} for s in sites}
    store = MemoryStore()
    Scheduler(store).add_job(spec, sites, steps=3, init=init)
    restored = Scheduler(store)
    for name, params in restored.weights("kept").params.items():
        assert torch.equal(params["A"], init[name]["A"]) and torch.equal(params["B"], init[name]["B"])
    with pytest.raises(ValueError, match="parameter `A` has shape"):
        Scheduler().add_job(spec, sites, steps=3,
                            init={n: {"A": torch.zeros(3, 3), "B": p["B"]} for n, p in init.items()})
