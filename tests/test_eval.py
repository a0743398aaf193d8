"""Evaluation while training: eval metrics, best export, early stopping, fit metrics, curves."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import rel_err

import colaflow
from colaflow import AdamW, JobSpec, LowRank, Schedule, Trainer
from colaflow.adapters.merge import merged
from colaflow.data.batches import IGNORE, from_map, stack
from colaflow.engine.evaluate import eval_map, evaluate, greedy, parse
from colaflow.engine.host import Host
from colaflow.engine.loss import causal_lm
from colaflow.errors import InvalidArgument
from colaflow.export import adapters_of
from colaflow.models import tiny
from colaflow.studies.plot import write_png
from colaflow.wire.client import Client
from procs import start_edge, start_server, stop, wait_done, wait_workers

VOCAB = 96


def qa_rows(n: int, seed: int, prompt: int = 5, answer: int = 3) -> list[dict]:
    """Prompt/answer token rows: labels -100 over the prompt, the answer's ids after."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(1, VOCAB, (prompt,), generator=g).tolist()
        a = torch.randint(1, VOCAB, (answer,), generator=g).tolist()
        out.append({"input_ids": p + a, "labels": [IGNORE] * prompt + a})
    return out


def snapshot(adapters: dict) -> dict:
    return {s: {n: p.detach().clone() for n, p in a.named_parameters()} for s, a in adapters.items()}


def run(spec: JobSpec, train: list[dict], steps: int, evals: dict | None, model=None, before=None) -> Trainer:
    """An in-process run; `before(trainer, t)` is called ahead of each step."""
    trainer = Trainer(model if model is not None else tiny("llama"), [])
    trainer.add_job(spec, steps, parse(evals))
    batches = from_map({"examples": train, "batch_size": 4, "seed": 0})
    for t in range(steps):
        if trainer.scheduler.job(spec.job_id).state != "running" and t:
            break
        if before is not None:
            before(trainer, t)
        trainer.step({spec.job_id: next(batches)})
    return trainer


def test_eval_loss_every_n_steps_equals_an_independent_forward():
    """Steps 0, N, 2N, ... and the last carry eval_loss: the loss of the adapters that step used,
    as a separate merged forward of the same model computes it."""
    train = qa_rows(12, 0)
    held = train[:6]  # seen rows: the loss must fall (random held-out rows teach nothing)
    spec = JobSpec("j", LowRank(r=4), AdamW(lr=3e-2))
    base, used = tiny("llama"), {}
    trainer = run(spec, train, 8, eval_map(eval_data=held, every=3), model=copy.deepcopy(base),
                  before=lambda tr, t: used.__setitem__(t, snapshot(tr.adapters("j"))))
    metrics = trainer.scheduler.job("j").metrics
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 3, 6, 7]
    batch = stack(parse(eval_map(eval_data=held)).examples)
    for m in metrics:
        if "eval_loss" not in m:
            continue
        adapters = {s: copy.deepcopy(a) for s, a in trainer.adapters("j").items()}
        for s, a in adapters.items():
            a.load_state_dict(used[m["step"]][s])
        with torch.no_grad(), merged(base, adapters):
            row_sum, row_count = causal_lm(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                           batch)
        want = float(row_sum.sum() / row_count.sum())
        assert abs(m["eval_loss"] - want) <= 1e-5 * abs(want), (m["step"], m["eval_loss"], want)
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]  # the job learnt something the eval sees
    both = evaluate(trainer.host, "j", parse(eval_map(eval_data=held, eval_prompts=held)))  # one shared forward
    assert both["eval_loss"] == evaluate(trainer.host, "j", parse(eval_map(eval_data=held)))["eval_loss"]


def test_eval_does_not_change_the_trajectory():
    """With adapter dropout (random draws in every training step), eval on every step leaves the
    adapters bit for bit as a run without eval."""
    train, held = qa_rows(12, 0), qa_rows(6, 1)
    spec = JobSpec("j", LowRank(r=4, dropout=0.1), AdamW(lr=3e-2))
    torch.manual_seed(0)
    plain = snapshot(run(spec, train, 6, None).adapters("j"))
    torch.manual_seed(0)
    evaluated = run(spec, train, 6, eval_map(eval_data=held, eval_prompts=held, every=1))
    assert all("eval_loss" in m and "eval_exact_match" in m for m in evaluated.scheduler.job("j").metrics)
    got = snapshot(evaluated.adapters("j"))
    assert all(torch.equal(got[s][n], plain[s][n]) for s in plain for n in plain[s])


def test_exact_match_is_greedy_generation():
    """Teacher-forced exact match agrees with a real greedy decode: answers made of the model's own
    greedy continuation all match, and a changed first token never does."""
    host = Host(tiny("llama"))
    host.add_job(JobSpec("j", LowRank(r=4)))
    prompts = qa_rows(6, 2, prompt=4) + qa_rows(5, 3, prompt=7)  # two prompt lengths, two decode batches
    ev = parse(eval_map(eval_prompts=prompts))
    own = greedy(host, "j", ev.prompts)
    rows = [{"input_ids": r["input_ids"][:r["labels"].count(IGNORE)] + o,
             "labels": r["labels"][:r["labels"].count(IGNORE)] + o} for r, o in zip(prompts, own)]
    seen = {}
    ev = parse(eval_map(eval_prompts=rows))
    ev.metric = lambda p, r: seen.update(p=p, r=r) or {"agree": sum(a == b for a, b in zip(p, r)) / len(p)}
    out = evaluate(host, "j", ev)
    assert out["eval_exact_match"] == 1.0 and out["eval_agree"] == 1.0 and seen["p"] == own
    wrong = [{"input_ids": r["input_ids"][:-3] + [(r["input_ids"][-3] % (VOCAB - 1)) + 1] + r["input_ids"][-2:],
              "labels": r["labels"][:-3] + [(r["labels"][-3] % (VOCAB - 1)) + 1] + r["labels"][-2:]} for r in rows]
    assert evaluate(host, "j", parse(eval_map(eval_prompts=wrong)))["eval_exact_match"] == 0.0


def test_early_stopping_ends_the_job_done_with_the_reason():
    session = colaflow.Session(model="tiny-llama")
    held = qa_rows(6, 1)  # random answers: exact match stays 0, so no eval ever improves on the first
    job = session.submit(qa_rows(12, 0), steps=40, batch_size=4, optimizer=AdamW(lr=1e-6), eval_prompts=held,
                         eval_every=2, patience=2)
    status = job.wait(progress=False)
    assert status["state"] == "done" and status["step"] == 5
    assert status["error"].startswith("stopped early at step 4: no eval improvement in 2 evals")
    assert [m["step"] for m in job.metrics() if "eval_exact_match" in m] == [0, 2, 4]


def test_best_export_equals_the_adapters_at_the_best_step(tmp_path):
    """A learning rate that overshoots: the best eval is not the last, and `best` exports its adapters."""
    train = qa_rows(12, 0)
    spec = JobSpec("j", LowRank(r=4), AdamW(lr=1.0))
    used = {}
    trainer = run(spec, train, 12, eval_map(eval_data=train, every=2),
                  before=lambda tr, t: used.__setitem__(t, snapshot(tr.adapters("j"))))
    evals = {m["step"]: m["eval_loss"] for m in trainer.scheduler.job("j").metrics if "eval_loss" in m}
    best = min(evals, key=evals.get)
    assert best != max(evals), evals  # else this test would not tell best from last
    got = snapshot(adapters_of(trainer.scheduler.weights("j", "best")))
    assert all(torch.equal(got[s][n], used[best][s][n]) for s in got for n in got[s])
    assert trainer.scheduler.weights("j", "best").versions == {s: best for s in got}  # S=0, I=1: step t uses version t
    last = snapshot(adapters_of(trainer.scheduler.weights("j")))
    assert any(not torch.equal(got[s][n], last[s][n]) for s in got for n in got[s])


def test_metrics_carry_lr_grad_norm_and_bytes(peft_reference):
    """grad_norm at step t is the norm over all sites of the gradient of the fit that made the version
    step t used — PEFT's gradient norm of step t-1 — and lr that fit's scheduled rate."""
    schedule = Schedule("linear", warmup=2, total=10)
    spec = JobSpec("j", LowRank(r=4, alpha=8), AdamW(lr=1e-2, schedule=schedule))
    model = tiny("llama")
    trainer = Trainer(model, [])
    trainer.add_job(spec, 6)
    ref = peft_reference(model, trainer, "j", spec.adapter, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(ref.opt, schedule.factor)
    batches = from_map({"examples": qa_rows(12, 0), "batch_size": 4, "seed": 0})
    norms = []
    for _ in range(6):
        batch = next(batches)
        trainer.step({"j": batch})
        ref.step([batch])
        lr_sched.step()
        grads = [p.grad for layer in ref.layers.values() for p in layer.parameters() if p.grad is not None]
        norms.append(float(sum(g.double().pow(2).sum() for g in grads)) ** 0.5)
    metrics = trainer.scheduler.job("j").metrics
    assert "lr" not in metrics[0] and "grad_norm" not in metrics[0]  # step 0 uses version 0: no fit yet
    for t, m in enumerate(metrics[1:], start=1):
        assert m["grad_norm"] > 0 and rel_err(torch.tensor(m["grad_norm"]), torch.tensor(norms[t - 1])) < 1e-4
        assert m["lr"] == pytest.approx(1e-2 * schedule.factor(t - 1), rel=1e-9)
        assert m["tokens_per_s"] > 0 and m["bytes_sent"] == m["bytes_received"] == 0  # in process: no wire
    assert {"loss", "tokens", "staleness", "seconds", "time", "fits"} <= set(metrics[-1])


def test_grpc_server_reports_eval_metrics_and_exports_best(tmp_path):
    """A server process and an edge daemon on loopback: the eval metrics equal the in-process run's,
    fit metrics and wire bytes arrive, and `which=best` exports the best step's versions."""
    train, held = qa_rows(12, 0), qa_rows(6, 1)
    spec = JobSpec("remote", LowRank(r=4), AdamW(lr=3e-2))
    evals = eval_map(eval_data=held, eval_prompts=held, every=3)
    server, address = start_server(tmp_path)
    edge = start_edge(tmp_path, address, "a")
    client = Client(address)
    try:
        wait_workers(client, 1)
        client.submit_map(spec, {"examples": train, "batch_size": 4, "seed": 0, "eval": evals}, steps=7)
        assert wait_done(client, "remote").state == "done"
        metrics = client.metrics_so_far("remote")
        path = client.export("remote", tmp_path / "best", which="best")
        with pytest.raises(InvalidArgument, match="`which` must be last or best"):
            client.export("remote", tmp_path / "bad", which="worst")
        with pytest.raises(InvalidArgument, match="`metric` runs in process only"):
            colaflow.Session(address=address).submit(train, steps=2, eval_prompts=held, metric=lambda p, r: {})
    finally:
        client.close()
        stop(edge, server)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test server runs
    try:
        want = run(spec, train, 7, evals).scheduler.job("remote").metrics
    finally:
        torch.set_num_threads(threads)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 3, 6]
    for got, ref in zip(metrics, want):
        for key in ("eval_loss", "eval_exact_match", "grad_norm", "lr"):
            assert (key in got) == (key in ref)
            if key in got:
                assert math.isclose(got[key], ref[key], rel_tol=1e-6), (got["step"], key, got[key], ref[key])
    assert all(m["grad_norm"] > 0 for m in metrics[1:])
    sent = [m["bytes_sent"] for m in metrics]
    assert sent[-1] > 0 and sent == sorted(sent) and metrics[-1]["bytes_received"] > 0
    evaluated = [m for m in metrics if "eval_exact_match" in m]
    best = max(evaluated, key=lambda m: m["eval_exact_match"])  # the first of the highest: ties keep the earlier
    meta = json.loads((path / "adapter.json").read_text())
    assert set(meta["versions"].values()) == {best["step"]}


def test_bad_eval_input_is_refused_with_a_clear_error():
    session = colaflow.Session(model="tiny-llama")
    train = qa_rows(8, 0)
    no_prompt = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    with pytest.raises(InvalidArgument, match=r"`eval_prompts\[0\]` has no prompt"):
        session.submit(train, steps=2, batch_size=4, eval_prompts=no_prompt)
    with pytest.raises(InvalidArgument, match="`patience` needs an eval set"):
        session.submit(train, steps=2, batch_size=4, patience=3)
    with pytest.raises(InvalidArgument, match="`metric` needs `eval_prompts`"):
        session.submit(train, steps=2, batch_size=4, eval_data=train, metric=lambda p, r: {})
    with pytest.raises(InvalidArgument, match="`eval_every` must be an int >= 1"):
        session.submit(train, steps=2, batch_size=4, eval_data=train, eval_every=0)
    with pytest.raises(ValueError, match=r"`eval_data\[0\]` holds token id 500"):
        parse({"examples": [{"input_ids": [1, 500], "labels": [1, 500]}]}, vocab=VOCAB)
    with pytest.raises(InvalidArgument, match="`eval_prompts` need a causal language model"):
        colaflow.Session(model=tiny("bert"), loss="seq_cls").submit(
            [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4, steps=2, batch_size=4, eval_prompts=train)
    job = session.submit(train, steps=2, batch_size=4)
    job.wait(progress=False)
    with pytest.raises(InvalidArgument, match="has no eval yet"):
        job.export("unused", which="best")
    assert session.jobs()  # nothing refused above left a job behind, nor broke the session
    assert len(session.jobs()) == 1


def test_a_bad_fit_metric_in_an_update_is_refused():
    from colaflow.adapters.base import param_shapes
    from colaflow.control.acceptance import check_update
    from colaflow.control.records import SiteRecord
    from colaflow.sites import find_sites
    from colaflow.wire.serde import update_from_proto, update_to_proto

    spec = JobSpec("j", LowRank(r=2), state_every=0)
    site = find_sites(tiny("llama"), None)[0]
    rec = SiteRecord(site, param_shapes(spec.adapter, site))
    params = {n: torch.zeros(s) for n, s in rec.shapes.items()}
    u = colaflow.Update("j", site.name, 1, params, 0.0, 0, None, 0.25, 1e-3)
    back = update_from_proto(*update_to_proto(u))
    assert (back.grad_norm, back.lr) == (0.25, 1e-3)
    check_update(spec, rec, u)
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="`grad_norm` must be a finite number >= 0"):
            check_update(spec, rec, colaflow.Update("j", site.name, 1, params, 0.0, 0, None, bad, 1e-3))


def test_write_png_writes_a_png_of_loss_and_every_eval_key(tmp_path):
    metrics = [{"step": t, "loss": 3.0 / (t + 1), **({"eval_loss": 3.1 / (t + 1), "eval_exact_match": t / 10,
                                                     "eval_bleu": t / 20} if t % 5 == 0 else {})} for t in range(11)]
    path = write_png(metrics, tmp_path / "out" / "curves.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side: losses, exact match, bleu
    with pytest.raises(ValueError, match="no `loss`"):
        write_png([{"step": 0}], tmp_path / "x.png")
