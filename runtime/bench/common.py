"""Benchmark plumbing: alternating timed rounds, medians, and peak memory in a fresh process."""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ..learn.messages import Packet
from ..models import load
from ..wire.codec import encode


def alternate(sides: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each side, the sides interleaved round by round."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_during(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes above the current level while `fn` runs: resident (Linux: VmHWM reset) on the CPU,
    allocated on a CUDA device."""
    gc.collect()
    if device.startswith("cuda"):
        dev = torch.device(device)  # `cuda:N`: that device's counters, not the current one's
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def measure_in_subprocess(module: str, side: str, args: list[str]) -> dict:
    """Run `python -m module --mem-side side` in a fresh process; it prints one JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS
    out = subprocess.run([sys.executable, "-m", module, "--mem-side", side, *args], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result), flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def token_batch(vocab: int, rows: int, tokens: int, seed: int) -> dict:
    """Random full-length token rows with labels: a benchmark batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_model(name: str, device: str = "cpu"):
    return load(name, verbose=False)[0].to(device)


def synced(fn: Callable[[], None], device: str) -> Callable[[], None]:
    """`fn`, then wait for the device: so a timed call includes its kernels."""
    if not device.startswith("cuda"):
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(torch.device(device))
    return run


def mem_side_main(run_side: Callable[[str, str, str], None]) -> None:
    """The `python -m colaflow.bench.X --mem-side SIDE` entry that `measure_in_subprocess` starts."""
    p = argparse.ArgumentParser()
    p.add_argument("--mem-side", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    run_side(a.mem_side, a.model, a.device)


# one step's packets of SmolLM2-135M's shape for one worker (q_proj and v_proj of 30 layers, 8 x 128
# tokens, the shared input once): what the wire and state benches move

LAYERS, TOKENS, HIDDEN, KV = 30, 8 * 128, 576, 192


def step_packets(step: int = 0):
    g = torch.Generator().manual_seed(step)
    packets = []
    for layer in range(LAYERS):
        x = torch.randn(TOKENS, HIDDEN, generator=g)  # (N, 576): shared by q_proj and v_proj
        pre = f"model.layers.{layer}.self_attn."
        packets.append(Packet("bench", pre + "q_proj", step, 0, x, torch.randn(TOKENS, HIDDEN, generator=g) * 1e-4))
        packets.append(Packet("bench", pre + "v_proj", step, 0, x, torch.randn(TOKENS, KV, generator=g) * 1e-4))
    return packets


def step_bytes(codec: str, dedup: bool) -> int:
    """Encoded tensor bytes of one SmolLM2 step (q_proj, v_proj, 8 x 128 tokens)."""
    x, gq, gv = torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, KV)
    per_layer = encode(x, codec).nbytes * (1 if dedup else 2) + encode(gq, codec).nbytes + encode(gv, codec).nbytes
    return LAYERS * per_layer
