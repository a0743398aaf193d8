"""`colaflow bench e2e`: the main job (invented facts into SmolLM2-135M) end to end, every way it runs.

Wall time from submit to the last step (each deployment first settles for 5 s), and held-out
exact match of the result, for: (a) the
in-process reference (`Session(model=...)`), (b) a server and 1, 2 and 4 edge daemons over gRPC on
loopback, (c) a local Ray instance with 2 worker actors, (d) a single-process PEFT LoRA run of the
same task (same batches, optimizer, schedule and initial adapters). The server's idle fraction is 1 - (time in its
steps) / (wall time). Last line:
{"grpc2_vs_inprocess", "ray2_vs_inprocess", "inprocess_vs_peft", "eval_gap_vs_peft"} (eval gap in
points of exact match, PEFT minus colaflow over gRPC with 2 workers).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from .common import report

STEPS, BATCH, FACTS, RANK, LR = 60, 8, 16, 8, 3e-3


def _spec():
    from colaflow import AdamW, LowRank, Schedule

    return dict(adapter=LowRank(r=RANK, alpha=2 * RANK), targets=["q_proj", "v_proj"], batch_size=BATCH,
                optimizer=AdamW(lr=LR, schedule=Schedule("linear", warmup=STEPS // 10, total=STEPS)), steps=STEPS)


def _exact_match(model, tokenizer, adapters_dir: Path, held_out) -> float:
    from colaflow.adapters.merge import merged
    from colaflow.export import load
    from colaflow.studies.tasks.knowledge import exact_match

    _, adapters = load(adapters_dir)
    with merged(model, adapters):
        return exact_match(model, tokenizer, held_out)


def _run(session, examples, name: str, work: Path) -> tuple[float, Path, list[dict]]:
    t = time.perf_counter()
    job = session.submit(examples, job_id=name, **_spec())
    job.wait(timeout=3600, progress=False)
    wall = time.perf_counter() - t
    return wall, job.export(work / name, format="native"), job.metrics()


def _peft(model, examples, held_out, tokenizer) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    from colaflow.data.batches import from_map, to_map
    from colaflow.engine.loss import causal_lm
    from colaflow.learn.optim import AdamW, Schedule
    from colaflow.studies.tasks.knowledge import exact_match

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                         target_modules=["q_proj", "v_proj"]))
    _same_start(pm, model)
    opt, sched = AdamW(lr=LR, schedule=Schedule("linear", warmup=STEPS // 10, total=STEPS)).build(
        [p for p in pm.parameters() if p.requires_grad])
    batches = from_map(to_map(examples, BATCH, 0))
    t = time.perf_counter()
    for _ in range(STEPS):
        b = next(batches)
        rs, rc = causal_lm(pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
        (rs.sum() / rc.sum()).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t
    pm.eval()
    with torch.no_grad():
        em = exact_match(pm, tokenizer, held_out)
    return wall, em


def _same_start(pm, model) -> None:
    """PEFT's LoRA layers start where colaflow's seeded adapters do (a fair race, not two random draws)."""
    from colaflow import JobSpec, LowRank
    from colaflow.adapters.base import build_adapter
    from colaflow.learn.fit import site_seed
    from colaflow.sites import find_sites

    spec = JobSpec("e2e", LowRank(r=RANK, alpha=2 * RANK), target_modules=["q_proj", "v_proj"])
    inner = pm.base_model.model
    with torch.no_grad():
        for site in find_sites(model, spec.target_modules):
            a = build_adapter(spec.adapter, site, seed=site_seed(spec, site))
            layer = inner.get_submodule(site.name)
            layer.lora_A["default"].weight.copy_(a.A)
            layer.lora_B["default"].weight.copy_(a.B)


def _settle() -> None:
    """Let a just-started deployment finish booting (Ray's agents, the daemons' imports) before timing."""
    time.sleep(5)


def main(args: argparse.Namespace) -> int:
    from colaflow import Session
    from colaflow.local import LocalCluster
    from colaflow.models import load
    from colaflow.studies.tasks.knowledge import eval_pairs, make_facts, train_examples

    model, tokenizer = load(args.model)
    facts = make_facts(FACTS, seed=0)
    examples = [{k: v.tolist() for k, v in e.items() if k != "attention_mask"}
                for e in train_examples(tokenizer, facts)]
    held_out = eval_pairs(facts, held_out=True)
    work = Path(tempfile.mkdtemp(prefix="colaflow-e2e-"))
    print(f"e2e: {args.model}, {FACTS} invented facts ({len(examples)} questions), {STEPS} steps of {BATCH}, lowrank "
          f"r={RANK} on q_proj/v_proj, S=0; held-out exact match on {len(held_out)} paraphrases; {work}", flush=True)
    rows: dict[str, dict] = {}

    def record(name: str, wall: float, em: float, metrics: list[dict] | None = None) -> None:
        busy = sum(m.get("seconds", 0.0) for m in metrics or [])
        rows[name] = {"wall_s": round(wall, 1), "exact_match": round(100 * em, 1),
                      "server_idle": round(1 - busy / wall, 3) if metrics else None}
        idle = f"  server idle {rows[name]['server_idle']:.0%}" if metrics else ""
        print(f"  {name:14s} {wall:7.1f} s   exact match {100 * em:5.1f}%{idle}", flush=True)

    with Session(copy.deepcopy(model)) as s:
        wall, path, metrics = _run(s, examples, "inprocess", work)
    record("inprocess", wall, _exact_match(model, tokenizer, path, held_out), metrics)
    for n in args.workers or [1, 2, 4]:
        with LocalCluster(args.model, workers=n, server_threads=2, edge_threads=1) as cluster:
            _settle()
            with Session(address=cluster.address) as s:
                wall, path, metrics = _run(s, examples, f"grpc{n}", work)
        record(f"grpc{n}", wall, _exact_match(model, tokenizer, path, held_out), metrics)
    try:
        from colaflow.ray import RayDeployment

        deployment = RayDeployment(args.model, workers=2, threads=1, server_threads=2)  # as the gRPC runs
        _settle()
        try:
            with Session(address=deployment.address) as s:
                wall, path, metrics = _run(s, examples, "ray2", work)
        finally:
            deployment.stop()
        record("ray2", wall, _exact_match(model, tokenizer, path, held_out), metrics)
    except ImportError as e:
        print(f"  ray2           skipped: {e}")
    wall, em = _peft(model, examples, held_out, tokenizer)
    record("peft", wall, em)
    def vs_inprocess(name: str) -> float | None:
        return round(rows[name]["wall_s"] / rows["inprocess"]["wall_s"], 3) if name in rows else None
    out = {"grpc2_vs_inprocess": vs_inprocess("grpc2"), "ray2_vs_inprocess": vs_inprocess("ray2"),
           "inprocess_vs_peft": round(rows["inprocess"]["wall_s"] / rows["peft"]["wall_s"], 3),
           "eval_gap_vs_peft": round(rows["peft"]["exact_match"]
                                     - rows.get("grpc2", rows["inprocess"])["exact_match"], 1),
           "runs": rows}
    report(out)
    return 0
