"""Task losses as (per-row loss sum, per-row count), so each job normalises over its own tokens."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data.batches import IGNORE

__all__ = ["IGNORE", "LossFn", "causal_lm", "per_job", "seq_cls", "token_cls"]

# (model output, batch) -> (row loss sums (B,), row counts (B,))
LossFn = Callable[[object, dict], tuple[torch.Tensor, torch.Tensor]]


def causal_lm(output, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on `labels` (IGNORE where no loss), summed per row."""
    logits = output.logits  # (B, T, V)
    labels = next_token_labels(batch["labels"])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                         reduction="none").view(labels.shape)  # (B, T)
    return ce.sum(1), (labels != IGNORE).sum(1)


def token_cls(output, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy without shift (masked LM, tagging), summed per row."""
    logits, labels = output.logits, batch["labels"].long()  # (B, T, V), (B, T)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                         reduction="none").view(labels.shape)
    return ce.sum(1), (labels != IGNORE).sum(1)


def seq_cls(output, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence classification: one cross-entropy term per row; `labels` (B,) class ids."""
    logits, labels = output.logits, batch["labels"].long()  # (B, C), (B,)
    if labels.dim() != 1:
        raise ValueError(f"`labels` of a classification batch must be one class id per row, got shape "
                         f"{tuple(labels.shape)} (examples carry `label`, not token `labels`)")
    bad = labels[(labels < 0) | (labels >= logits.shape[-1])]
    if bad.numel():
        raise ValueError(f"`labels` holds class id {int(bad[0])}; the model has classes 0..{logits.shape[-1] - 1}")
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    return ce, torch.ones_like(batch["labels"])


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels where position t predicts token t+1 (IGNORE at the end). The labels shift,
    not the logits: slicing (B, T, V) would copy it, forward and backward."""
    return F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE)  # (int32 labels index as int64 ones do)


def job_tokens(row_count: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each job's labelled tokens in the batch; refuses a job with none."""
    out = {}
    for job, idx in rows.items():
        out[job] = row_count[idx.to(row_count.device)].sum()
        if int(out[job]) == 0:
            raise ValueError(f"job {job!r}: its rows in this batch carry no labelled token")
    return out


def per_job(row_sum: torch.Tensor, row_count: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each job's mean loss over its own rows' tokens."""
    return {job: row_sum[rows[job]].sum() / count for job, count in job_tokens(row_count, rows).items()}
