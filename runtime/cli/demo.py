"""`colaflow demo`: inject invented facts into SmolLM2-135M with ColA.

By default it runs the real thing on loopback: a server process holding the frozen model and two
edge daemons that own the adapters, all started for you; `--in-process` runs the reference loop.

    colaflow demo                      # ~4 min on 2 CPU cores
    colaflow demo --steps 40 --facts 9 # a quicker look
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune SmolLM2 on invented facts and report exact match")
    p.add_argument("--model", default="smollm2-135m", help="model name or local HF directory")
    p.add_argument("--facts", type=int, default=24, help="number of invented facts")
    p.add_argument("--steps", type=int, default=100, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="edge daemons to start")
    p.add_argument("--staleness", type=int, default=1,
                   help="S: steps the server may run ahead of the adapters (0: synchronous and exact; "
                        "1 overlaps the devices' fits with the next forward)")
    p.add_argument("--state-every", type=int, default=1,
                   help="send each learner's full state (optimizer moments) to the server every N fits, so a lost "
                        "device is replaced exactly; 0: parameters only")
    p.add_argument("--eval-every", type=int, default=25,
                   help="held-out exact match (and eval loss) every N steps while training, as eval metrics")
    p.add_argument("--in-process", action="store_true", help="server step and fits in this one process")
    p.add_argument("--out", default="colaflow-out/knowledge", help="where the adapter is saved")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from colaflow import AdamW, JobSpec, LowRank, Schedule
    from colaflow.adapters.merge import merged
    from colaflow.engine.evaluate import eval_map
    from colaflow.export import save_peft
    from colaflow.models import load
    from colaflow.studies.plot import write_png
    from colaflow.studies.tasks.knowledge import encode, eval_pairs, exact_match, make_facts, train_examples

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
                   staleness=args.staleness, seed=args.seed, state_every=args.state_every)
    out = Path(args.out)
    # the held-out paraphrases as eval prompts: the job reports eval_exact_match while it trains
    held_rows = [encode(tokenizer, q, a) for q, a in held_out]
    evals = eval_map(eval_data=held_rows, eval_prompts=held_rows, every=args.eval_every)
    if args.in_process:
        adapters, metrics = _in_process(model, spec, examples, evals, args)
    else:
        adapters, metrics = _over_grpc(args.model, spec, examples, evals, args, out)
    losses = [m["loss"] for m in metrics]
    with merged(model, adapters):  # adapted inference at the base model's cost
        after = exact_match(model, tokenizer, held_out)
        seen = exact_match(model, tokenizer, eval_pairs(facts, held_out=False))
    save_peft(adapters, out / "peft", base_model=args.model, model=model)
    curves = write_png(metrics, out / "curves.png", title=f"colaflow demo: {args.facts} invented facts on {args.model}")
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    print(f"  exact match after fine-tuning:  {after:.1%} on held-out paraphrases ({seen:.1%} on training phrasings)")
    print(f"  adapter saved to {out / 'native'} (colaflow) and {out / 'peft'} (PEFT LoRA); curves in {curves}")
    print(f"  done in {time.time() - t0:.0f} s")
    return 0


def _report(m: dict) -> None:
    """One line per eval step: held-out exact match as the job trains."""
    if "eval_exact_match" in m:
        print(f"  step {m['step']:>4}: eval_exact_match {m['eval_exact_match']:.1%}  eval_loss {m['eval_loss']:.3f}",
              flush=True)


def _in_process(model, spec, examples, evals, args):
    import copy

    from colaflow import Trainer
    from colaflow.data import batches
    from colaflow.engine.evaluate import parse
    from colaflow.export import save

    trainer = Trainer(copy.deepcopy(model), [])
    trainer.add_job(spec, args.steps, parse(evals))
    trainer.run({spec.job_id: batches(examples, args.batch_size, seed=args.seed)}, args.steps, progress=False)
    adapters = trainer.adapters(spec.job_id)
    save(adapters, spec, Path(args.out) / "native")
    metrics = trainer.scheduler.job(spec.job_id).metrics
    for m in metrics:
        _report(m)
    return adapters, metrics


def _over_grpc(model_name, spec, examples, evals, args, out: Path):
    from tqdm.auto import tqdm

    from colaflow.data.batches import to_map
    from colaflow.export import load as load_native
    from colaflow.local import LocalCluster

    print(f"  starting a server and {args.workers} edge daemons on loopback ...", flush=True)
    with LocalCluster(model_name, workers=args.workers, server_threads=2) as cluster:
        client = cluster.client
        print(f"  server {cluster.address}; logs in {cluster.workdir}", flush=True)
        data = to_map([{k: v.tolist() for k, v in e.items() if k != "attention_mask"} for e in examples],
                      args.batch_size, args.seed)
        client.submit_map(spec, {**data, "eval": evals}, steps=args.steps)
        metrics: list[dict] = []
        bar = tqdm(total=args.steps, desc="colaflow", unit="step")

        def follow():
            for m in client.metrics(spec.job_id):
                metrics.append(m)
                if "eval_exact_match" in m:
                    bar.write(f"  step {m['step']:>4}: eval_exact_match {m['eval_exact_match']:.1%}  "
                              f"eval_loss {m['eval_loss']:.3f}")
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", staleness=m["staleness"])
        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        while (status := client.get(spec.job_id)).state in ("waiting", "running"):
            time.sleep(0.2)
        watcher.join(timeout=5)
        bar.close()
        if status.state != "done":
            raise SystemExit(f"colaflow demo: job ended {status.state}: {status.error}; logs in {cluster.workdir}")
        path = client.export(spec.job_id, out / "native")
        metrics = client.metrics_so_far(spec.job_id)  # all of them, whatever the follower got to print
    _, adapters = load_native(path)
    return adapters, metrics
