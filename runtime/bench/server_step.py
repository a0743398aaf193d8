"""`colaflow bench server-step`: the ColA server step against a PEFT LoRA training step.

Same model (SmolLM2-135M), same batch (8 x 128 tokens), same sites (q_proj, v_proj, r=8), CPU.
ColA: forward with adapters + backward for site gradients only (capture included), no optimizer.
PEFT: forward + backward (LoRA parameter gradients) + AdamW step. Sides alternate; medians.
Last line: {"time_ratio": colaflow / peft, "mem_ratio": colaflow / peft, ...}
"""
from __future__ import annotations

import argparse
import copy

import torch

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

MODULE = "colaflow.bench.server_step"
ROWS, TOKENS = 8, 128


def _batch(vocab: int, device: str) -> dict:
    return {k: v.to(device) for k, v in token_batch(vocab, ROWS, TOKENS, seed=0).items()}


def _sides(model, which: set[str], device: str = "cpu") -> dict:
    from colaflow import JobSpec, LowRank
    from colaflow.engine.host import Host

    batch = _batch(model.config.vocab_size, device)
    sides = {}
    if which & {"colaflow", "colaflow-merged", "colaflow-kept"}:
        for name, merge in (("colaflow", False), ("colaflow-merged", True), ("colaflow-kept", False)):
            if name in which:
                host = Host(model if len(which) == 1 else copy.deepcopy(model))
                host.add_job(JobSpec("bench", LowRank(r=8, alpha=8), merge=merge))
                for a in host.jobs["bench"].adapters.values():  # a trained-looking adapter, not zeros
                    a.B.data.normal_(0, 0.01)
                # packets stream out of the backward to a sink that drops them (what the step itself
                # holds); "-kept" collects them all until the step ends, as a server holds them
                # until the devices' updates cover them (on a GPU: in host memory, not the device's)
                sink = None if name == "colaflow-kept" else (lambda group: None)
                sides[name] = (lambda h, e: lambda: h.step(batch | {"jobs": ["bench"] * ROWS}, emit=e))(host, sink)
    if "peft" in which:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(copy.deepcopy(model) if len(which) > 1 else model,
                                    LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-4)

        def peft_step():
            peft_model(**batch).loss.backward()  # HF's own causal-LM loss, as a PEFT user trains
            opt.step()
            opt.zero_grad(set_to_none=True)
        sides["peft"] = peft_step
    return {k: synced(fn, device) for k, fn in sides.items()}


def main(args: argparse.Namespace) -> int:
    from colaflow.wire.channel import tune_allocator

    tune_allocator()  # every side times under the allocator `colaflow serve` runs with
    torch.manual_seed(0)
    model = load_model(args.model, args.device)
    print(f"server-step: {args.model} on {args.device}, batch {ROWS} x {TOKENS} tokens, lowrank r=8 on q_proj,v_proj, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating rounds", flush=True)
    t = alternate(_sides(model, {"colaflow", "colaflow-merged", "peft"}, args.device), args.repeats)
    for k, v in t.items():
        print(f"  time  {k:18s} {v * 1000:8.0f} ms/step   {ROWS * TOKENS / v:7.0f} tokens/s")
    mem = {s: measure_in_subprocess(MODULE, s, ["--model", args.model, "--device", args.device])["peak"]
           for s in ("colaflow", "colaflow-merged", "colaflow-kept", "peft")}
    for k, v in mem.items():
        print(f"  peak  {k:18s} {mib(v)} above the loaded model (2 steps, fresh process)")
    report({"time_ratio": round(t["colaflow"] / t["peft"], 3), "mem_ratio": round(mem["colaflow"] / mem["peft"], 3),
            "merged_time_ratio": round(t["colaflow-merged"] / t["peft"], 3),
            "merged_mem_ratio": round(mem["colaflow-merged"] / mem["peft"], 3),
            "kept_mem_ratio": round(mem["colaflow-kept"] / mem["peft"], 3),
            "colaflow_ms": round(t["colaflow"] * 1000), "peft_ms": round(t["peft"] * 1000)})
    return 0


def _mem_side(side: str, model_name: str, device: str) -> None:
    model = load_model(model_name, device)
    step = _sides(model, {side}, device)[side]
    def two_steps():  # the second step shows the optimizer state PEFT keeps; results are dropped
        step()
        step()
    peak = peak_during(two_steps, device)
    report({"side": side, "peak": peak})


if __name__ == "__main__":
    mem_side_main(_mem_side)
