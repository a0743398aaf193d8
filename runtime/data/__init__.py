"""Data as people have it, into batches: sources and row formats, data maps, batches, job files.

    batches.py  token-id rows -> data maps -> (B, T) batches; several jobs' batches collate into one
    sources.py  `rows`: JSONL/JSON/CSV/Parquet, datasets, text, prompt/completion, chat -> token-id rows
    jobfile.py  YAML job files: `Session.submit`'s keyword arguments
"""
from __future__ import annotations

from .batches import (
                      DEFAULT_BATCH,
                      IGNORE,
                      PAD,
                      batches,
                      check_limits,
                      collate,
                      from_map,
                      stack,
                      tensor_rows,
                      to_map,
                      token_ids,
)

__all__ = ["DEFAULT_BATCH", "IGNORE", "PAD", "batch_shape", "batches", "check_limits", "collate", "from_map",
           "stack",
           "tensor_rows", "to_map", "token_ids"]
