"""`colaflow bench blackbox`: the black-box server step against the ColA step, and top-k against exact.

Same model (SmolLM2-135M), same batch (8 x 128 tokens). ColA: forward with lowrank r=8 on q_proj,
v_proj + backward for the site gradients (packets to a sink). Black-box: the forward under no_grad
and the top-k log-probs (k = 8, 64, or all: exact). Sides alternate; medians; peak memory of two
steps in a fresh process each. Bytes per token: what a step's packets hold.

Quality: the knowledge task (colaflow.studies.tasks.knowledge), a short in-process run of a SmallLM per
representation from the same start on the same batches; held-out loss of the combination on
paraphrases never trained on (each under its own representation, and under the exact one) and
greedy exact match. Last line: {"time_ratio_k8": black-box / ColA, ..., "heldout_k8": ...}
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .common import (
    alternate,
    load_model,
    measure_in_subprocess,
    mem_side_main,
    mib,
    peak_during,
    report,
    synced,
    token_batch,
)

MODULE = "colaflow.bench.blackbox"
ROWS, TOKENS = 8, 128
MODES = {"blackbox-k8": 8, "blackbox-k64": 64, "blackbox-exact": 0}


def _host(model, side: str):
    from colaflow import JobSpec, LowRank, SmallLM
    from colaflow.engine.host import Host

    host = Host(model)
    if side == "cola":
        host.add_job(JobSpec("bench", LowRank(r=8, alpha=8)))
        for a in host.jobs["bench"].adapters.values():  # a trained-looking adapter, not zeros
            a.B.data.normal_(0, 0.01)
    else:
        host.add_job(JobSpec("bench", SmallLM(top_k=MODES[side])))
    return host


def _sides(model, which: list[str], device: str = "cpu") -> tuple[dict, dict]:
    """{side: one server step} and {side: bytes per token of a step's packets}."""
    batch = {k: v.to(device) for k, v in token_batch(model.config.vocab_size, ROWS, TOKENS, seed=0).items()}
    batch["jobs"] = ["bench"] * ROWS
    steps, per_token = {}, {}
    for side in which:
        host = _host(model, side)
        sent = []

        def sink(group, sent=sent):  # packets leave a server once sent: count their bytes, keep nothing
            sent.append(sum(p.g.nbytes for p in group) + sum({id(p.x): p.x.nbytes for p in group}.values()))
        steps[side] = synced((lambda h, s: lambda: h.step(batch, emit=s))(host, sink), device)
        steps[side]()
        per_token[side] = sum(sent) / (ROWS * TOKENS)
    return steps, per_token


def _quality(model, tokenizer, steps: int, log, with_em: bool = True) -> dict:
    """Held-out loss and exact match of a SmallLM trained per representation (a short run)."""
    from colaflow import AdamW, JobSpec, SmallLM, Trainer
    from colaflow.adapters.smalllm import combined_logprobs, generate
    from colaflow.adapters.topk import OUTPUT, model_logprobs
    from colaflow.data import batches
    from colaflow.data.batches import IGNORE
    from colaflow.studies.tasks.knowledge import encode, eval_pairs, make_facts, prompt, train_examples

    facts = make_facts(24, seed=0)
    train = train_examples(tokenizer, facts)
    heldout = [encode(tokenizer, q, a) for q, a in eval_pairs(facts, held_out=True)]
    base = model_logprobs(model)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]

    @torch.no_grad()
    def heldout_loss(small, exact_eval: bool) -> float:
        total, count = 0.0, 0
        for e in heldout:
            ids = e["input_ids"][None]
            if exact_eval and small.spec.top_k:  # the same small model on the large model's full distribution
                lp = torch.log_softmax(base(ids, None, model.config.vocab_size)[0] + small(ids), -1)
            else:
                lp = combined_logprobs(small, base, ids)  # (1, T, V)
            target = F.pad(e["labels"][None, 1:], (0, 1), value=IGNORE)
            total += float(F.cross_entropy(lp[0], target[0], ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
        return total / count

    def exact_match(small) -> float:
        hits, pairs = 0, eval_pairs(facts, held_out=True)
        for q, answer in pairs:
            ids = tokenizer(prompt(q), return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = generate(base, small, ids, max_new_tokens=8, eos_token_id=newline)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
            hits += text.rstrip(".") == answer
        return hits / len(pairs)

    out = {}
    for side, k in MODES.items():
        torch.manual_seed(0)
        spec = JobSpec(side, SmallLM(top_k=k, hidden=64), AdamW(lr=1e-2))
        trainer = Trainer(model, [spec])
        data = batches(train, 8, seed=0)
        for _ in range(steps):
            trainer.step({side: next(data)})
        small = trainer.adapters(side)[OUTPUT].eval()
        if side == "blackbox-k8":
            out["base"] = heldout_loss(_fresh(spec, small), exact_eval=True)
            log(f"  quality base model alone     held-out loss {out['base']:.3f}")
        out[side] = {"heldout": heldout_loss(small, False), "heldout_exact_eval": heldout_loss(small, True),
                     "em": exact_match(small) if with_em else float("nan")}
        log(f"  quality {side:20s} held-out loss {out[side]['heldout']:.3f} (on the exact distribution "
            f"{out[side]['heldout_exact_eval']:.3f}), exact match {out[side]['em']:.2f}, {steps} steps")
    return out


def _fresh(spec, small):
    from colaflow.adapters.base import build_adapter

    return build_adapter(spec.adapter, small.site, seed=0).eval()


def main(args: argparse.Namespace) -> int:
    from colaflow.models import load

    torch.manual_seed(0)
    model, tokenizer = load(args.model, verbose=False)
    model = model.to(args.device)
    sides = ["cola", *MODES]
    print(f"blackbox: {args.model} on {args.device}, batch {ROWS} x {TOKENS} tokens, ColA = lowrank r=8 on "
          f"q_proj,v_proj; {torch.get_num_threads()} threads, {args.repeats} alternating rounds", flush=True)
    steps, per_token = _sides(model, sides, args.device)
    t = alternate(steps, args.repeats)
    for k, v in t.items():
        print(f"  time  {k:16s} {v * 1000:8.0f} ms/step   {ROWS * TOKENS / v:7.0f} tokens/s   "
              f"{per_token[k]:10.0f} bytes/token on the wire", flush=True)
    mem = {s: measure_in_subprocess(MODULE, s, ["--model", args.model, "--device", args.device])["peak"] for s in sides}
    for k, v in mem.items():
        print(f"  peak  {k:16s} {mib(v)} above the loaded model (2 steps, fresh process)", flush=True)
    quality = _quality(model, tokenizer, args.steps or 60, lambda s: print(s, flush=True))
    result = {}
    for side in MODES:
        tag = side.split("-")[1]
        result |= {f"time_ratio_{tag}": round(t[side] / t["cola"], 3),
                   f"mem_ratio_{tag}": round(mem[side] / mem["cola"], 3),
                   f"bytes_per_token_{tag}": round(per_token[side]),
                   f"heldout_{tag}": round(quality[side]["heldout"], 4),
                   f"em_{tag}": quality[side]["em"]}
    result |= {"cola_ms": round(t["cola"] * 1000), "cola_bytes_per_token": round(per_token["cola"]),
               "heldout_base": round(quality["base"], 4)}
    report(result)
    return 0


def _mem_side(side: str, model_name: str, device: str) -> None:
    model = load_model(model_name, device)
    step = _sides(model, [side], device)[0][side]
    peak = peak_during(lambda: (step(), step()), device)
    report({"side": side, "peak": peak})


if __name__ == "__main__":
    mem_side_main(_mem_side)
