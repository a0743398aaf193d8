"""The mixed-tenant step: several jobs' rows in one server step, kept lean in time and memory.

- **Micro-batches of whole jobs** (`micro_batches`). A job's loss involves its own rows only, so
  a step over many tenants runs as a few forwards and backwards of at most `mix_rows` rows each
  and changes no job's result; server memory is then one micro-batch's activations, not the
  whole step's. A job is never split (a job with more rows runs alone).
- **One adapter call per site** (`stacked_delta`). Where every run of rows in a micro-batch has
  a low-rank adapter of one shape, their A and B are stacked (a copy per job, not per row) and
  applied with two batched matmuls, instead of one small call per job. Other kinds, routing or
  conditional adapters and uneven runs take one call per run (`Host._delta`).
"""
from __future__ import annotations

import torch

from ..adapters.base import Adapter
from ..adapters.lowrank import LowRankAdapter


def micro_batches(jobs: list[str], max_rows: int) -> list[torch.Tensor] | None:
    """Row indices of each micro-batch: whole jobs, in order of first appearance, packed up to
    `max_rows` rows. None: the batch runs as one (a single job, or it fits)."""
    order = list(dict.fromkeys(jobs))
    if len(order) == 1 or len(jobs) <= max_rows:
        return None
    rows = {j: [] for j in order}
    for i, j in enumerate(jobs):
        rows[j].append(i)
    parts: list[list[int]] = [[]]
    for j in order:
        if parts[-1] and len(parts[-1]) + len(rows[j]) > max_rows:
            parts.append([])
        parts[-1] += rows[j]
    return [torch.tensor(sorted(p)) for p in parts]


def sub_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The rows `rows` of a batch: every tensor with one entry per row, and `jobs`."""
    n = len(batch["jobs"])
    out = {k: v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
           else v for k, v in batch.items()}
    out["jobs"] = [batch["jobs"][i] for i in rows.tolist()]
    return out


def stackable(adapters: list[Adapter], x: torch.Tensor, sizes: list[int]) -> bool:
    """Whether `stacked_delta` can serve these runs: low-rank adapters of one shape on a token
    input, every run the same length."""
    a0 = adapters[0]
    if not isinstance(a0, LowRankAdapter) or a0.site.kind not in ("linear", "conv1d"):
        return False
    if len(set(sizes)) != 1 or not x.is_floating_point() or x.dim() < 2 or x.shape[0] != sum(sizes):
        return False
    return all(type(a) is LowRankAdapter and a.site.kind == a0.site.kind and a.A.shape == a0.A.shape
               and a.B.shape == a0.B.shape and a.A.device == a0.A.device for a in adapters)


def stacked_delta(adapters: list[Adapter], x: torch.Tensor) -> torch.Tensor:
    """The runs' LoRA deltas in one go: x (n*L, ..., in) holds n runs of L rows, run i through
    adapters[i]: delta_i = s_i * B_i A_i x_i, as (n*L, ..., out)."""
    n = len(adapters)
    A = torch.stack([a.A for a in adapters])  # (n, r, in)
    B = torch.stack([a.B for a in adapters])  # (n, out, r)
    scales = [a.scaling for a in adapters]
    xs = x.reshape(n, -1, x.shape[-1]).to(A.dtype)  # (n, L*T, in), in the adapters' dtype (as `_call`)
    delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2))  # (n, L*T, out)
    if len(set(scales)) == 1:  # one alpha (the usual case): a Python float, no per-site device copy
        delta = delta * scales[0]
    else:  # float32 scales, as a Python float would be: 16/12 in bf16 is 0.2 % off
        delta = (delta * torch.tensor(scales, device=x.device).view(n, 1, 1)).to(delta.dtype)
    return delta.view(*x.shape[:-1], B.shape[1])
