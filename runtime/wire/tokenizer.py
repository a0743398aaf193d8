"""A tokenizer as files and back: how a server's tokenizer travels to its clients (GetTokenizer).

    files = to_files(tokenizer)                          # server: what save_pretrained writes, as bytes
    tokenizer = from_files(files, max_length=8192)       # client: an HF tokenizer, offline, no remote code
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ..errors import InvalidArgument

MAX_FILES_BYTES = 48 << 20  # the biggest tokenizers (e.g. Gemma's) are ~35 MiB; all must fit one gRPC message
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def to_files(tokenizer) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes (tokenizer.json, tokenizer_config.json, chat template ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def from_files(files: dict[str, bytes], max_length: int | None = None):
    """An HF tokenizer from `to_files` output; `max_length` (the model's context) becomes its model_max_length."""
    from transformers import AutoTokenizer

    if not files:
        raise InvalidArgument("the tokenizer has no files")
    if sum(len(b) for b in files.values()) > MAX_FILES_BYTES:
        raise InvalidArgument(f"the tokenizer's files exceed {MAX_FILES_BYTES >> 20} MiB")
    bad = [n for n in files if not _NAME.fullmatch(n)]
    if bad:  # names become paths below: no separators, no dot files
        raise InvalidArgument(f"tokenizer file name {bad[0][:64]!r} is not a plain file name")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:  # trust_remote_code stays False: a tokenizer from the network never runs code here
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise InvalidArgument(f"cannot load the tokenizer from its files {sorted(files)}: {e}") from None
    if max_length:
        tok.model_max_length = int(max_length)
    return tok
