"""`colaflow bench coda`: the main job (invented facts into SmolLM2-135M) with a CoDA conditional adapter
at reduction 1, 2, 4 and 8: held-out exact match against packet bytes per step.

In process (the same Host, Scheduler and Worker as every transport); the bytes are the packets'
wire encoding (`serde.packets_to_proto`, raw codec: header and payload) as a server would send them.
CoDA sits where Houlsby does (o_proj and down_proj), hidden 32; the LoRA row is the main job's own
adapter (lowrank r=8 on q_proj/v_proj) for scale. Last line: {"coda_r<R>": {"exact_match", "bytes_per_step"},
..., "lora": {...}}.
"""
from __future__ import annotations

import argparse
import copy
import time

from .common import report
from .e2e import BATCH, FACTS, LR, STEPS

REDUCTIONS = (1, 2, 4, 8)
HIDDEN = 32


def _wire_bytes(packets) -> int:
    from colaflow.control.protocol import Packets
    from colaflow.wire import serde

    frame, parts = serde.packets_to_proto(Packets(packets[0].job, packets[0].step, packets))
    return frame.ByteSize() + sum(len(p) for p in parts)


def _train(model, adapter, targets, examples, steps: int) -> tuple[object, float, float]:
    """(trainer, bytes per step, seconds per step) of one in-process run."""
    from colaflow import AdamW, JobSpec, Schedule, Trainer
    from colaflow.data.batches import from_map, to_map

    spec = JobSpec("main", adapter, AdamW(lr=LR, schedule=Schedule("linear", warmup=max(1, steps // 10), total=steps)),
                   target_modules=targets)
    trainer = Trainer(model, [spec])
    sent: list[int] = []
    step = trainer.host.step

    def counted(batch, *a, **kw):  # the same step; its packets are measured as the wire would carry them
        result = step(batch, *a, **kw)
        sent.append(_wire_bytes(result.packets))
        return result
    trainer.host.step = counted
    batches = from_map(to_map(examples, BATCH, 0))
    t = time.perf_counter()
    for _ in range(steps):
        trainer.step({"main": next(batches)})
    trainer.flush()
    return trainer, sum(sent) / len(sent), (time.perf_counter() - t) / steps


def main(args: argparse.Namespace) -> int:
    from colaflow import CoDA, LowRank
    from colaflow.export import attached
    from colaflow.models import load
    from colaflow.studies.tasks.knowledge import eval_pairs, exact_match, make_facts, train_examples

    steps = args.steps or STEPS
    model, tokenizer = load(args.model)
    facts = make_facts(FACTS, seed=0)
    examples = [{k: v.tolist() for k, v in e.items() if k != "attention_mask"}
                for e in train_examples(tokenizer, facts)]
    held_out = eval_pairs(facts, held_out=True)
    print(f"coda: {args.model}, {FACTS} invented facts, {steps} steps of {BATCH}, AdamW lr {LR}; held-out exact match "
          f"on {len(held_out)} paraphrases", flush=True)
    runs = {f"coda_r{r}": (CoDA(hidden=HIDDEN, reduction=r), None) for r in REDUCTIONS}
    runs["lora"] = (LowRank(r=8, alpha=16), ["q_proj", "v_proj"])
    rows = {}
    for name, (adapter, targets) in runs.items():
        base = copy.deepcopy(model)
        trainer, per_step, seconds = _train(base, adapter, targets, examples, steps)
        with attached(copy.deepcopy(model), trainer.specs["main"], trainer.adapters("main")) as m:
            em = exact_match(m, tokenizer, held_out)
        rows[name] = {"exact_match": round(100 * em, 1), "bytes_per_step": int(per_step),
                      "s_per_step": round(seconds, 2)}
        print(f"  {name:8s} exact match {100 * em:5.1f}%   {per_step / 1e6:7.2f} MB/step   {seconds:5.2f} s/step",
              flush=True)
    report(rows)
    return 0
