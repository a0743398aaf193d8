"""`colaflow eval --ood`: does adaptation cost OOD robustness? (classification jobs, intent task)

    colaflow eval --ood --model minilm-l6 --kinds lowrank,houlsby,adalink --steps 150

Trains in this process a linear probe on the frozen model (the `base` row) and one classification
job per adapter kind, then prints in-distribution accuracy and OOD-detection AUROC / FPR@95 (%)
for MSP, energy and Mahalanobis scores, and last a JSON line with the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate adapted models (--ood: OOD-detection robustness of classifiers)")
    p.add_argument("--ood", action="store_true", required=True,
                   help="OOD robustness of classification jobs on the offline intent task (held-out intents as OOD)")
    p.add_argument("--model", default="minilm-l6", help="minilm-l6 (default), smollm2-135m, tiny-llama, tiny-bert, "
                                                        "or an HF directory")
    p.add_argument("--kinds", default="lowrank", help="comma-separated adapter kinds (kinds not registered here are "
                                                      "skipped with a message), e.g. lowrank,houlsby,adalink")
    p.add_argument("--targets", help="comma-separated body sites of the adapted jobs (default: the family's, "
                                     "e.g. query,value for BERT)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the adapted jobs (head included)")
    p.add_argument("--probe-lr", type=float, default=1e-2, help="learning rate of the base model's linear probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from colaflow.engine.classify import classifier
    from colaflow.studies.robustness import evaluate, format_table
    from colaflow.studies.tasks.intents import make_intents

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f"colaflow eval: `--steps` and `--batch-size` must be >= 1, "
                         f"got {args.steps}, {args.batch_size}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    model, tokenizer = args.model, None
    if args.model.startswith("tiny-"):  # a random model: exercises the pipeline, its numbers mean nothing
        from transformers import AutoTokenizer

        from colaflow.models import packaged_dir, tiny

        tokenizer = AutoTokenizer.from_pretrained(packaged_dir("minilm-l6"))
        body = tiny(args.model[len("tiny-"):], vocab=tokenizer.vocab_size)
        model = classifier(body, len(make_intents(seed=args.seed).intents))
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731  (the table and JSON go to stdout)
    try:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        rows = evaluate(model, kinds, steps=args.steps, targets=targets, batch_size=args.batch_size, lr=args.lr,
                        probe_lr=args.probe_lr, seed=args.seed, tokenizer=tokenizer, say=say,
                        progress=sys.stderr.isatty())
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"colaflow eval: {e}") from None
    print(format_table(rows))
    print(json.dumps({"model": args.model, "steps": args.steps, "rows": [r.to_dict() for r in rows]}))
    return 0
