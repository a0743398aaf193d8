"""`colaflow bench state`: what exact failover costs — the bytes of one fit's update with and without
the learner state (optimizer moments) that lets the server hand a lost device's sites to another
worker exactly, for LowRank r=8 and MLP adapters on SmolLM2-135M's q_proj and v_proj (30 layers).

The updates go through the real wire path (serde -> framed Work messages); the reference for
scale is one step's packets to the same worker (x once per layer, g of q and v, raw, 8 x 128 tokens).
Last line: {"lowrank_state_ratio", "mlp_state_ratio", ...} (bytes with state over bytes without).
"""
from __future__ import annotations

import argparse
import time

import torch

from .common import HIDDEN, KV, LAYERS, TOKENS, report, step_bytes


def _update_bytes(adapter, state_every: int) -> tuple[int, float]:
    """Wire bytes of one fit's updates over every q/v site, and seconds to encode and decode them."""
    from colaflow import AdamW, JobSpec, Learner, Packet
    from colaflow.sites import Site
    from colaflow.wire import serde

    spec = JobSpec("bench", adapter, AdamW(lr=3e-4), state_every=state_every)
    total, seconds = 0, 0.0
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        for name, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            site = Site(f"model.layers.{layer}.self_attn.{name}", "linear", HIDDEN, out)
            learner = Learner(spec, site)
            x, grad = torch.randn(64, HIDDEN, generator=g), torch.randn(64, out, generator=g) * 1e-3
            update = learner.consume(Packet("bench", site.name, 0, 0, x, grad))
            t = time.perf_counter()
            inbox = serde.Inbox("server")
            for raw in serde.to_server(update, 0):
                total += len(raw)
                inbox.feed(raw)
            seconds += time.perf_counter() - t
    return total, seconds


def main(args: argparse.Namespace) -> int:
    from colaflow import MLP, LowRank

    packets = step_bytes("raw", dedup=True)
    print(f"state: one fit of every SmolLM2 q_proj/v_proj site ({2 * LAYERS} sites), AdamW; one step's raw "
          f"packets for scale: {packets / 2**20:.1f} MiB ({TOKENS} tokens)", flush=True)
    out = {}
    for label, adapter in (("lowrank", LowRank(r=8, alpha=16)), ("mlp", MLP(hidden=128))):
        plain, t_plain = _update_bytes(adapter, state_every=0)
        full, t_full = _update_bytes(adapter, state_every=1)
        print(f"  {label:8s} update {plain / 2**20:7.2f} MiB per fit, with learner state {full / 2**20:7.2f} MiB "
              f"(x{full / plain:.2f}); {full / packets:.1%} of a step's packets; encode+decode "
              f"{t_plain * 1e3:.0f} -> {t_full * 1e3:.0f} ms", flush=True)
        for k in (4, 16):
            print(f"  {'':8s} state_every={k:<2d}: {(plain + (full - plain) / k) / 2**20:7.2f} MiB per fit on average")
        out |= {f"{label}_update_bytes": plain, f"{label}_with_state_bytes": full,
                f"{label}_state_ratio": round(full / plain, 3), f"{label}_state_vs_packets": round(full / packets, 4)}
    report(out)
    return 0
