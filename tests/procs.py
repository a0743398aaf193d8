"""Helpers for the transport tests: real processes on loopback (see colaflow.local), data, waiting."""
from __future__ import annotations

import time

import torch

from colaflow.data.batches import IGNORE
from colaflow.local import start_edge, start_server, stop  # noqa: F401  (re-exported for the tests)


def examples(vocab: int, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = IGNORE
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def wait_done(client, job: str, timeout: float = 120.0):
    end = time.time() + timeout
    while time.time() < end:
        s = client.get(job)
        if s.state in ("done", "failed", "cancelled"):
            return s
        time.sleep(0.2)
    raise TimeoutError(f"job {job} not done after {timeout} s: {client.get(job)}")


def wait_workers(client, n: int, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while client.health().workers < n:
        if time.time() > end:
            raise TimeoutError(f"fewer than {n} workers connected after {timeout} s")
        time.sleep(0.1)
