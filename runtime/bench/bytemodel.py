"""`colaflow bench link --shape llama-3-8b`: packet bytes per step at a model's true widths.

One step runs on 1 layer of the shape (random bf16 weights, the shape's own widths; vocabulary and
layer count aside) with LowRank r=8 on q_proj and v_proj, for each packet mode. Every packet frame
is encoded by the wire (`serde`, each codec) and its bytes counted. A full packet's bytes grow with
the tokens and the layers, so they are scaled by both (tokens per step / tokens measured, layers of
the shape / 1); a projected packet's do not depend on the tokens and are scaled by the layers only.
Printed per mode and codec: bytes per step and the seconds they take on 100 Mbit/s, 1 Gbit/s and
10 Gbit/s links (payload only, no protocol overhead), labelled as scaled.
"""
from __future__ import annotations

import argparse

import torch

from .common import report

LINKS_MBIT = (100, 1_000, 10_000)
CODECS = ("raw", "bf16", "int8", "int4")
MEASURED_TOKENS = 256


def packet_bytes(shape: str, rows: int, tokens: int, codecs=CODECS) -> dict:
    """{mode: {codec: bytes per step}} for a step of `rows` x `tokens` on the whole `shape`."""
    from transformers import LlamaForCausalLM

    from colaflow import JobSpec, LowRank
    from colaflow.control.protocol import Packets
    from colaflow.engine.host import Host
    from colaflow.wire import serde

    from .scale import config

    cfg = config(shape)
    layers = cfg.num_hidden_layers
    cfg.num_hidden_layers, cfg.vocab_size = 1, 1024  # the widths that travel, not the model's depth or vocabulary
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    host = Host(model)
    n = min(MEASURED_TOKENS, tokens)
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    out: dict = {}
    for mode in ("full", "projected"):
        job = f"bytes-{mode}"
        host.add_job(JobSpec(job, LowRank(r=8, alpha=16), target_modules=["q_proj", "v_proj"], packets=mode))
        packets = host.step(batch | {"jobs": [job]}).packets
        host.remove_job(job)
        scale = layers * (rows * tokens / n if mode == "full" else 1)
        out[mode] = {}
        for codec in codecs:  # the frames as the Work stream sends them: envelopes, payload, padding
            wire = sum(len(raw) for raw in serde.to_worker(Packets(job, 0, packets), 0, codec, codec))
            out[mode][codec] = int(wire * scale)
    return out


def main(args: argparse.Namespace) -> int:
    rows, tokens = args.rows or 8, args.tokens or 2048
    result = packet_bytes(args.shape, rows, tokens, args.codecs or CODECS)
    print(f"bytes: {args.shape}, a step of {rows} x {tokens} tokens, lowrank r=8 on q_proj,v_proj (measured on 1 "
          f"layer, {min(MEASURED_TOKENS, tokens)} tokens, bf16; scaled to the shape's layers and the step's tokens)")
    print(f"  {'mode':10s} {'codec':6s} {'bytes/step':>14s}" + "".join(f"{f'{m} Mbit/s':>14s}" for m in LINKS_MBIT))
    rows_out = {}
    for mode, by_codec in result.items():
        for codec, nbytes in by_codec.items():
            secs = {m: nbytes * 8 / (m * 1e6) for m in LINKS_MBIT}
            rows_out[f"{mode} {codec}"] = {"bytes_per_step": nbytes, **{f"s_at_{m}mbit": round(s, 4)
                                                                       for m, s in secs.items()}}
            print(f"  {mode:10s} {codec:6s} {nbytes / 1e9:11.3f} GB" + "".join(f"{s:13.3f}s" for s in secs.values()))
    full, proj = result["full"].get("bf16", result["full"]["raw"]), result["projected"]["raw"]
    report({"shape": args.shape, "rows": rows, "tokens": tokens, "scaled_from_layers": 1,
            "full_bf16_gb": round(full / 1e9, 3), "projected_raw_mb": round(proj / 1e6, 3),
            "projected_vs_full_bf16": round(proj / full, 6), "runs": rows_out})
    return 0
