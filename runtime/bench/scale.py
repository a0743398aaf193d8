"""`colaflow bench scale`: the server step on large Llama shapes (random weights) against PEFT.

Shapes from a config (`--shape 0.5b,1b`, a name below, or an HF config.json): bf16 weights against
PEFT LoRA (bf16), NF4 weights against PEFT QLoRA (NF4), each side's activation checkpointing, and
16 tenants hosted at once against one. Every memory figure is a fresh process's peak above the
loaded model (PEFT: 2 steps, the second holds its AdamW state; ColA: 1 step of each tenant); times
alternate the two sides.
ColA: forward with adapters + backward for site gradients (packets dropped as they leave: what the
step itself holds). PEFT: forward + backward + AdamW step, in training mode, as its users train.
Last line: {"mem_vs_peft_lora_bf16", "time_vs_peft_lora_bf16", "mem_vs_peft_qlora_nf4",
"ckpt_mem_ratio", "tenants16_mem_vs_one", ...} for the largest shape measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..models import load
from .common import alternate, mib, peak_during, report, synced, token_batch

MODULE = "colaflow.bench.scale"
SHAPES = {  # Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
    "0.5b": (1024, 4096, 24, 16, 16, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's
    "3b": (3072, 8192, 28, 24, 8, 128256),  # Llama-3.2-3B's
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256),
}
TARGETS = ["q_proj", "v_proj"]
TENANTS = 16


def config(shape: str):
    """A LlamaConfig of a named shape, or read from an HF config.json."""
    from transformers import AutoConfig, LlamaConfig

    if shape in SHAPES:
        h, i, n, heads, kv, vocab = SHAPES[shape]
        return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                           num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    path = Path(shape)
    if not path.exists():
        raise SystemExit(f"colaflow bench scale: --shape {shape!r} is neither {sorted(SHAPES)} nor a config.json")
    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def checkpoint_of(shape: str, root: Path) -> Path:
    """A directory with random bf16 weights of `shape` (saved once per run: NF4 quantizes from it)."""
    from transformers import AutoModelForCausalLM

    out = root / shape.replace("/", "_")
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config(shape), dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
    return out


def _side(side: str, path: Path, rows: int, tokens: int, device: str = "cpu"):
    """(model, step) of one side: `cola|peft` - `bf16|nf4` [- `ckpt`] [- `16`]."""
    from colaflow import JobSpec, LowRank
    from colaflow.engine.host import Host

    parts = side.split("-")
    who, weights, ckpt, tenants = parts[0], parts[1], "ckpt" in parts, TENANTS if "16" in parts else 1
    model, _ = load(str(path), dtype="bfloat16", quantize="nf4" if weights == "nf4" else None, device=device,
                    verbose=False)
    batch = {k: v.to(device) for k, v in token_batch(model.config.vocab_size, rows, tokens, seed=0).items()}
    if who == "cola":
        host = Host(model, checkpointing=ckpt)
        for t in range(tenants):
            host.add_job(JobSpec(f"t{t}", LowRank(r=8, alpha=8), target_modules=TARGETS, seed=t))
            for a in host.jobs[f"t{t}"].adapters.values():
                a.B.data.normal_(0, 0.01)

        def step():  # tenants step one after another, as the server runs them; packets leave and go
            for t in range(tenants):
                host.step(batch | {"jobs": [f"t{t}"] * rows}, emit=lambda group: None)
        return model, step
    from peft import LoraConfig, get_peft_model

    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS)).train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-4)

    def step():
        peft(**batch).loss.backward()  # HF's own causal-LM loss, as a PEFT user trains
        opt.step()
        opt.zero_grad(set_to_none=True)
    return peft, step


def _measure(side: str, path: Path, rows: int, tokens: int, threads: int, device: str = "cpu") -> int:
    """A side's peak above its loaded model, in a fresh process (freed memory goes back to the OS)."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", MODULE, "--mem-side", side, "--path", str(path), "--rows", str(rows),
                          "--tokens", str(tokens), "--threads", str(threads), "--device", device], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main(args: argparse.Namespace) -> int:
    shapes = (args.shape or "0.5b,1b").split(",")
    rows, tokens = args.rows or 4, args.tokens or 128
    threads = torch.get_num_threads()
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="colaflow-scale-") as tmp:
        for shape in shapes:
            path = checkpoint_of(shape, Path(tmp))
            cfg = config(shape)
            print(f"scale: {shape} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, random weights), "
                  f"{rows} x {tokens} tokens, lowrank r=8 on {','.join(TARGETS)}, {args.device}, {threads} threads",
                  flush=True)
            mem = {s: _measure(s, path, rows, tokens, threads, args.device) for s in
                   ("cola-bf16", "peft-bf16", "cola-nf4", "peft-nf4", "cola-bf16-ckpt", "peft-bf16-ckpt",
                    "cola-bf16-16")}
            for k, v in mem.items():
                print(f"  peak  {k:16s} {mib(v)} above the loaded model", flush=True)
            sides = {s: synced(_side(s, path, rows, tokens, args.device)[1], args.device)
                     for s in ("cola-bf16", "peft-bf16")}
            t = alternate(sides, args.repeats if args.repeats != 5 else 3)
            del sides
            for k, v in t.items():
                print(f"  time  {k:16s} {v:8.2f} s/step   {rows * tokens / v:7.0f} tokens/s", flush=True)
            result = {"shape": shape,
                      "mem_vs_peft_lora_bf16": round(mem["cola-bf16"] / mem["peft-bf16"], 3),
                      "time_vs_peft_lora_bf16": round(t["cola-bf16"] / t["peft-bf16"], 3),
                      "mem_vs_peft_qlora_nf4": round(mem["cola-nf4"] / mem["peft-nf4"], 3),
                      "ckpt_mem_ratio": round(mem["cola-bf16-ckpt"] / mem["cola-bf16"], 3),
                      "ckpt_mem_vs_peft_ckpt": round(mem["cola-bf16-ckpt"] / mem["peft-bf16-ckpt"], 3),
                      "tenants16_mem_vs_one": round(mem["cola-bf16-16"] / mem["cola-bf16"], 3),
                      "peak_mib": {k: round(v / 2**20) for k, v in mem.items()},
                      "s_per_step": {k: round(v, 2) for k, v in t.items()}}
            print(json.dumps(result), flush=True)
    report(result)
    return 0


def _mem_side() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--mem-side", "--path"):
        p.add_argument(flag, required=True)
    p.add_argument("--device", default="cpu")
    for flag in ("--rows", "--tokens", "--threads"):
        p.add_argument(flag, type=int, required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, step = _side(a.mem_side, Path(a.path), a.rows, a.tokens, a.device)
    for t in (*model.parameters(), *model.buffers()):  # safetensors loads weights mapped: page them in now, or
        t.detach().sum()  # the first step's resident peak counts the weights it touches as its own memory

    def steps() -> None:  # PEFT's second step holds its AdamW state; a server step keeps nothing between steps
        step()
        if a.mem_side.startswith("peft"):
            step()
    report({"side": a.mem_side, "peak": peak_during(synced(steps, a.device), a.device)})


if __name__ == "__main__":
    _mem_side()
