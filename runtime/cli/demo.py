"""`colaflow demo`: inject invented facts into SmolLM2-135M with ColA, in-process.

    colaflow demo                      # ~3 min on 2 CPU cores
    colaflow demo --steps 40 --facts 9 # a quicker look
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune SmolLM2 on invented facts and report exact match")
    p.add_argument("--model", default="smollm2-135m", help="model name or local HF directory")
    p.add_argument("--facts", type=int, default=24, help="number of invented facts")
    p.add_argument("--steps", type=int, default=120, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default="colaflow-out/knowledge", help="where the adapter is saved")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from colaflow import AdamW, JobSpec, LowRank, Schedule, Trainer
    from colaflow.data import batches
    from colaflow.export import save, save_peft
    from colaflow.merge import merged
    from colaflow.models import load
    from colaflow.tasks.knowledge import eval_pairs, exact_match, make_facts, train_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    print(f"colaflow demo: loading {args.model} ...", flush=True)
    model, tokenizer = load(args.model)
    facts = make_facts(args.facts, seed=args.seed)
    examples = train_examples(tokenizer, facts)
    held_out = eval_pairs(facts, held_out=True)
    print(f"  {len(facts)} invented facts, {len(examples)} training questions, "
          f"{len(held_out)} held-out paraphrases  (e.g. {held_out[0][0]!r} -> {held_out[0][1]!r})")
    before = exact_match(model, tokenizer, held_out)
    print(f"  exact match before fine-tuning: {before:.1%}", flush=True)

    spec = JobSpec("knowledge", LowRank(r=args.rank, alpha=2 * args.rank),
                   AdamW(lr=args.lr, schedule=Schedule("linear", warmup=args.steps // 10, total=args.steps)),
                   seed=args.seed)
    trainer = Trainer(model, [spec])
    trainer.run({"knowledge": batches(examples, args.batch_size, seed=args.seed)}, args.steps)
    adapters = trainer.adapters("knowledge")
    with merged(model, adapters):  # adapted inference at the base model's cost
        after = exact_match(model, tokenizer, held_out)
        seen = exact_match(model, tokenizer, eval_pairs(facts, held_out=False))
    out = Path(args.out)
    save(adapters, spec, out / "native", versions={s: l.version for (_, s), l in trainer.learners.items()})
    save_peft(adapters, out / "peft", base_model=args.model)
    loss = trainer.history["knowledge"]
    print(f"  loss {loss[0]:.3f} -> {loss[-1]:.3f} over {args.steps} steps")
    print(f"  exact match after fine-tuning:  {after:.1%} on held-out paraphrases ({seen:.1%} on training phrasings)")
    print(f"  adapter saved to {out / 'native'} (colaflow) and {out / 'peft'} (PEFT LoRA)")
    print(f"  done in {time.time() - t0:.0f} s")
    return 0
