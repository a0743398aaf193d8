"""Batches: dicts of (B, T) tensors; several jobs' batches collate into one mixed batch."""
from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F

IGNORE = -100  # a label with no loss (PyTorch's cross-entropy `ignore_index`)
PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE, "token_type_ids": 0}


def _pad_cat(ts: list[torch.Tensor], key: str) -> torch.Tensor:
    if ts[0].dim() < 2 or key not in PAD:
        return torch.cat(ts)
    T = max(t.shape[1] for t in ts)
    return torch.cat([F.pad(t, (0, T - t.shape[1]), value=PAD[key]) for t in ts])  # (sum B, T)


def stack(examples: list[dict]) -> dict:
    """One batch from examples (dicts of 1-D tensors), right-padded to the longest."""
    return {k: _pad_cat([e[k].unsqueeze(0) for e in examples], k) for k in examples[0]}


def collate(parts: list[tuple[str, dict]]) -> dict:
    """Concatenate (job_id, batch) parts row-wise, right-padded; adds `jobs`, one id per row."""
    if not parts:
        raise ValueError("nothing to collate")
    keys = set(parts[0][1])
    for job, b in parts:
        if set(b) != keys:
            raise ValueError(f"job {job!r}: batch keys {sorted(b)} differ from {sorted(keys)}")
    out = {k: _pad_cat([b[k] for _, b in parts], k) for k in keys}
    out["jobs"] = [job for job, b in parts for _ in range(len(b["labels"]))]
    return out


def batches(examples: list[dict], size: int, seed: int = 0) -> Iterator[dict]:
    """Shuffled batches of `size` examples, reshuffled every epoch, forever. Checked now, not at the first batch."""
    if len(examples) < size:
        raise ValueError(f"`batch_size` {size} is larger than the {len(examples)} examples")
    return _shuffled(examples, size, seed)


def _shuffled(examples: list[dict], size: int, seed: int) -> Iterator[dict]:
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order) - size + 1, size):
            yield stack([examples[j] for j in order[i:i + size]])


DEFAULT_BATCH = 8


def to_map(examples, batch_size: int | None = None, seed: int = 0) -> dict:
    """The data map of token-id rows (dicts with `input_ids`, optional `labels`): what travels to a server.
    `batch_size` None: 8 rows, or every row when there are fewer."""
    rows = []
    for i, e in enumerate(examples):
        if not isinstance(e, dict) or "input_ids" not in e:
            raise ValueError(f"example {i} must be a dict with `input_ids` (and optional `labels`), got "
                             f"{type(e).__name__}")
        row = {k: token_ids(e[k], f"example {i}", k) for k in ("input_ids", "labels") if k in e}
        if "label" in e:  # a classification example: one class id for the whole row
            row["label"] = _class_id(e["label"], f"example {i}")
        rows.append(row)
    if not rows:
        raise ValueError("no examples to train on")
    if batch_size is None:
        batch_size = min(DEFAULT_BATCH, len(rows))
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    return {"examples": rows, "batch_size": batch_size, "seed": seed}


def token_ids(values, where: str, key: str) -> list[int]:
    """`values` (a list, tensor or array of ints) as a list of ints; errors start with `where` (e.g. "row 3")."""
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: `{key}` must be a list of token ids, got {type(values).__name__}")
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not -(1 << 62) < t < 1 << 62:
            raise ValueError(f"{where}: `{key}` holds {t!r}; token ids are ints")
    return [int(t) for t in values]


def _class_id(value, where: str) -> int:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 1 << 31:
        raise ValueError(f"{where}: `label` must be a class id (an int >= 0), got {value!r}")
    return int(value)


def check_limits(d: dict, vocab: int | None, context: int | None, where: str = "data.examples") -> None:
    """Refuse token ids outside the model's vocabulary and rows longer than its context, naming the row."""
    for i, e in enumerate(d.get("examples") or []):
        ids, labels = e.get("input_ids", []), e.get("labels", [])
        if context is not None and len(ids) > context:
            raise ValueError(f"`{where}[{i}]` has {len(ids)} tokens; the model's context is {context}")
        if vocab is not None:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is None:
                bad = next((t for t in labels if t != IGNORE and not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"`{where}[{i}]` holds token id {bad}; the model's vocabulary is 0..{vocab - 1}")


def from_map(d: dict) -> Iterator[dict]:
    """Batches from a data map: {"examples": [{"input_ids": [...], "labels": [...]}], "batch_size", "seed"}.

    The same map always yields the same batches, so a restarted server can skip to any step.
    """
    if not isinstance(d, dict) or not isinstance(d.get("examples"), list) or not d["examples"]:
        raise ValueError("`data` must be a map with a non-empty `examples` list")
    examples = tensor_rows(d["examples"], "data.examples")
    size = d.get("batch_size", 8)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"`data.batch_size` must be a positive int, got {size!r}")
    return batches(examples, size, seed=int(d.get("seed", 0)))


def batch_shape(d: dict) -> tuple[int, int]:
    """(rows, tokens) of a data map's largest batch: its batch size, and its longest row."""
    rows = d["examples"]
    return min(int(d.get("batch_size", DEFAULT_BATCH)), len(rows)), max(len(r["input_ids"]) for r in rows)


def tensor_rows(rows: list, where: str) -> list[dict]:
    """Rows of a data map as 1-D tensors (`input_ids`, `attention_mask`, `labels`); `where` names them in errors.

    A row with `label` (one class id: classification) gets it as its `labels`; all rows alike."""
    examples = []
    for i, e in enumerate(rows):
        if not isinstance(e, dict) or "input_ids" not in e:
            raise ValueError(f"`{where}[{i}]` must be a map with `input_ids`")
        if ("label" in e) != ("label" in rows[0]) or ("label" in e and "labels" in e):
            raise ValueError(f"`{where}[{i}]`: every example has either `label` (a class id: "
                             "classification) or token `labels`, not both, and all alike")
        try:
            ids = torch.tensor(e["input_ids"], dtype=torch.long)
            labels = torch.tensor(_class_id(e["label"], f"`{where}[{i}]`") if "label" in e
                                  else e.get("labels", e["input_ids"]), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"`{where}[{i}]`: token ids must be lists of integers ({err})") from None
        if ids.dim() != 1 or ids.numel() == 0 or ("label" not in e and labels.shape != ids.shape):
            raise ValueError(f"`{where}[{i}]`: `input_ids` and `labels` must be equal-length lists")
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return examples
