"""Datasets as people have them -> token-id rows `{"input_ids": [...], "labels": [...]}` (-100: no loss).

    rows("data.jsonl", tokenizer)      # also .json, .csv, .parquet; a list of dicts; a datasets.Dataset or DataFrame
    rows([{"prompt": "2+2=", "completion": "4"}], tokenizer, max_length=2048)

One format per dataset, told by the fields of each row:

    text               {"text"}                         loss on every token; EOS appended
    prompt/completion  {"prompt", "completion"}         loss on the completion and its EOS only
    chat               {"messages": [{"role", "content"}, ...]}
                                                        the tokenizer's chat template; loss on assistant turns only
    pre-tokenised      {"input_ids", "labels"?}         as given (labels default to input_ids)
    classification     {"text" or "input_ids", "label"} one class id per row (`loss="seq_cls"` jobs)

Rows longer than `max_length` (default: the tokenizer's `model_max_length`, which a server's tokenizer
carries as the model's context) keep their first `max_length` tokens; pre-tokenised rows are never cut and
a too-long one is refused. Every error names the row (counted from 0), the file line where there is one,
and the field. See README "Data formats".
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from .batches import IGNORE, token_ids

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
_JSON_CELLS = ("input_ids", "labels", "messages")  # CSV cells that hold JSON, not text
_NO_LIMIT = 1 << 40  # HF's "no limit" model_max_length is ~1e30


def rows(source: Any, tokenizer: Any = None, max_length: int | None = None) -> list[dict]:
    """Token-id rows `{"input_ids", "labels"}` from any supported source (see the module docstring).

    `tokenizer` is an HF tokenizer, or a function returning one, called only when a row needs
    tokenising (so pre-tokenised data never fetches one); None is fine for pre-tokenised data.
    """
    tok = _Tokenizer(tokenizer, max_length)
    name, records = _records(source)
    out, first = [], None
    for where, row in records:
        if not isinstance(row, dict):
            raise InvalidArgument(f"{where}: a row must be a map of fields, got {type(row).__name__}")
        fmt = _format(row, where)
        if first is None:
            first = (fmt, where)
        elif fmt != first[0]:
            raise InvalidArgument(f"{where}: a {fmt} row in a {first[0]} dataset ({first[1]} is {first[0]}); "
                                  "one format per dataset")
        out.append(_ROW[fmt](row, where, tok))
    if not out:
        raise InvalidArgument(f"{name} holds no rows: nothing to train on")
    return out


# sources: (name, iterator of (where, row))

def _records(source: Any) -> tuple[str, Iterator[tuple[str, Any]]]:
    if isinstance(source, (str, os.PathLike)):
        return _file(Path(source))
    if isinstance(source, dict):
        if isinstance(getattr(source, "column_names", None), dict):  # a datasets.DatasetDict
            split = next(iter(source), "train")
            raise InvalidArgument(f"the dataset has splits {sorted(source)}: pass one, e.g. dataset[{split!r}]")
        raise InvalidArgument("the data is one map; pass a list of rows (maps), a file path or a datasets.Dataset")
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise InvalidArgument(f"cannot read data from a {type(source).__name__}: pass a list of rows (maps), a path "
                              f"to a {'/'.join(SUFFIXES)} file, or a datasets.Dataset")
    if hasattr(source, "columns") and hasattr(source, "to_dict"):  # a pandas DataFrame iterates its column names
        source = source.to_dict("records")
    of = " of the dataset" if hasattr(source, "column_names") else ""  # a datasets.Dataset yields its rows as maps
    return "the data", ((f"row {i}{of}", row) for i, row in enumerate(source))


def _file(path: Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    if path.suffix not in SUFFIXES:
        raise InvalidArgument(f"{path}: unknown data file type {path.suffix!r}; known: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such data file")
    name = path.name
    if path.suffix in (".jsonl", ".ndjson"):
        return name, _jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"{name}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise InvalidArgument(f"{name}: a .json data file holds a list of rows, got a {type(data).__name__}")
        return name, ((f"row {i} of {name}", row) for i, row in enumerate(data))
    if path.suffix == ".csv":
        return name, _csv(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidArgument(f"{name}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors are its own types
        raise InvalidArgument(f"{name}: cannot read it as Parquet ({e})") from None
    return name, ((f"row {i} of {name}", row) for i, row in enumerate(table.to_pylist()))


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    i = 0
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(_utf8(f, path.name), 1):
            if not line.strip():
                continue
            where = f"row {i} (line {n}) of {path.name}"
            try:
                yield where, json.loads(line)
            except ValueError as e:
                raise InvalidArgument(f"{where}: not valid JSON ({e})") from None
            i += 1


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(_utf8(f, path.name))
        for i, row in enumerate(reader):
            where = f"row {i} (line {reader.line_num}) of {path.name}"
            row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}  # empty cell: absent
            for key in _JSON_CELLS:
                if key in row:
                    try:
                        row[key] = json.loads(row[key])
                    except ValueError:
                        raise InvalidArgument(f'{where}: "{key}" must be JSON in a CSV cell, '
                                              f"got {row[key][:40]!r}") from None
            yield where, row


def _utf8(lines: Iterable[str], name: str) -> Iterator[str]:
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{name}: not UTF-8 text ({e.reason})") from None


# formats

def _format(row: dict, where: str) -> str:
    present = {k for k, v in row.items() if v is not None}
    if "label" in present:
        return "classification"
    if "input_ids" in present:
        return "pre-tokenised"
    if "messages" in present:
        return "chat"
    if "prompt" in present or "completion" in present:
        return "prompt/completion"
    if "text" in present:
        return "text"
    raise InvalidArgument(f'{where}: no data field among {sorted(present)[:8]}; a row holds "text", "prompt" and '
                          '"completion", "messages", or "input_ids"')


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise InvalidArgument(f'{where}: "{key}" is missing')
    if not isinstance(value, str):
        raise InvalidArgument(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    if not value:
        raise InvalidArgument(f'{where}: "{key}" is empty')
    return value


class _Tokenizer:
    """The tokenizer, resolved on the first row that needs one; and the length rule."""

    def __init__(self, tokenizer: Any, max_length: int | None):
        if max_length is not None and (type(max_length) is not int or max_length < 2):
            raise InvalidArgument(f"`max_length` must be an int >= 2, got {max_length!r}")
        self.source, self.tok, self.max_length = tokenizer, None, max_length

    def get(self, where: str, fmt: str):
        if self.tok is None:
            t = self.source
            if t is not None and not hasattr(t, "encode") and callable(t):
                try:
                    t = t()
                except InvalidArgument as e:  # e.g. the server's model has none; a network error stays one
                    raise InvalidArgument(f"{where}: {fmt} rows need a tokenizer, and none is at hand: {e}") from None
            if t is None:
                raise InvalidArgument(f"{where}: {fmt} rows need a tokenizer (pass `tokenizer=`), or give "
                                      'pre-tokenised rows ("input_ids", "labels")')
            self.tok = t
            if self.max_length is None:
                limit = getattr(t, "model_max_length", None)
                self.max_length = limit if isinstance(limit, int) and 1 < limit < _NO_LIMIT else None
        return self.tok

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tok.eos_token_id
        return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]

    def fit(self, ids: list[int], labels: list[int], where: str) -> dict:
        """Keep the first `max_length` tokens; a row left with nothing to learn from is an error."""
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            if all(t == IGNORE for t in labels):
                raise InvalidArgument(f"{where}: the prompt fills the first {self.max_length} tokens (the model's "
                                      "context): no token left to learn from")
        return {"input_ids": ids, "labels": labels}


def _text(row: dict, where: str, tok: _Tokenizer) -> dict:
    text = _string(row, "text", where)
    tok.get(where, "text")
    ids = tok.with_eos(tok.encode(text, True))
    return tok.fit(ids, list(ids), where)


def _classification(row: dict, where: str, tok: _Tokenizer) -> dict:
    """{"input_ids", "label"}: the row's tokens (text: cut to the context, no EOS) and its class id."""
    label = row["label"]
    if hasattr(label, "item"):
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise InvalidArgument(f'{where}: "label" must be a class id (an int >= 0), got {label!r}')
    if row.get("input_ids") is not None:
        try:
            ids = token_ids(row["input_ids"], where, "input_ids")
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
    else:
        text = _string(row, "text", where)
        tok.get(where, "classification")
        ids = tok.encode(text, True)[:tok.max_length]
    if not ids:
        raise InvalidArgument(f'{where}: "input_ids" must be a non-empty list')
    return {"input_ids": ids, "label": label}


def _prompt_completion(row: dict, where: str, tok: _Tokenizer) -> dict:
    prompt, completion = _string(row, "prompt", where), _string(row, "completion", where)
    tok.get(where, "prompt/completion")
    p, c = tok.encode(prompt, True), tok.with_eos(tok.encode(completion, False))
    return tok.fit(p + c, [IGNORE] * len(p) + c, where)


def _chat(row: dict, where: str, tok: _Tokenizer) -> dict:
    messages = _messages(row.get("messages"), where)
    t = tok.get(where, "chat")
    if not getattr(t, "chat_template", None):
        raise InvalidArgument(f'{where}: "messages" rows need a tokenizer with a chat template; this one has none')

    def render(msgs: list[dict], prompt: bool = False) -> str:
        return t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text, spans = render(messages), []
    for i, m in enumerate(messages):  # an assistant turn is what its prefix adds after the generation prompt
        if m["role"] == "assistant":
            start, end = render(messages[:i], prompt=True), render(messages[:i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise InvalidArgument(f"{where}: the chat template does not render conversations prefix by prefix, "
                                      "so the assistant turns cannot be found")
            spans.append((len(start), len(end)))
    ids, labels = _label_spans(t, text, spans)
    return tok.fit(ids, labels, where)


def _messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} maps, '
                              f"got {type(messages).__name__}")
    for j, m in enumerate(messages):
        field = f'"messages"[{j}]'
        if not isinstance(m, dict):
            raise InvalidArgument(f'{where}: {field} must be a map with "role" and "content", '
                                  f"got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InvalidArgument(f'{where}: {field}["{key}"] must be a string, got {type(m.get(key)).__name__}')
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise InvalidArgument(f'{where}: "messages" has no "assistant" turn: nothing to learn from')
    if roles[0] == "assistant":
        raise InvalidArgument(f'{where}: "messages"[0] is an assistant turn; a conversation opens with a system '
                              "or user turn")
    return messages


def _label_spans(t, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenise `text` once; tokens starting inside a span keep their label, the rest get IGNORE."""
    inside = lambda s: any(a <= s < b for a, b in spans)  # noqa: E731
    if getattr(t, "is_fast", False):
        enc = t(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return ids, [i if inside(s) else IGNORE for i, (s, _) in zip(ids, enc["offset_mapping"])]
    ids, labels, edges = [], [], sorted({0, len(text), *(e for s in spans for e in s)})
    for a, b in zip(edges, edges[1:]):  # a slow tokenizer has no offsets: tokenise piece by piece
        piece = list(t(text[a:b], add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if inside(a) else [IGNORE] * len(piece)
    return ids, labels


def _pretokenised(row: dict, where: str, tok: _Tokenizer) -> dict:
    try:
        ids = token_ids(row["input_ids"], where, "input_ids")
        labels = token_ids(row["labels"], where, "labels") if row.get("labels") is not None else list(ids)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if not ids or len(labels) != len(ids):
        raise InvalidArgument(f'{where}: "input_ids" ({len(ids)}) and "labels" ({len(labels)}) must be equal-length, '
                              "non-empty lists")
    limit = tok.max_length
    if limit is not None and len(ids) > limit:
        raise InvalidArgument(f"{where}: {len(ids)} tokens; the model's context is {limit} "
                              "(pre-tokenised rows are not cut)")
    return {"input_ids": ids, "labels": labels}


_ROW = {"text": _text, "prompt/completion": _prompt_completion, "chat": _chat, "pre-tokenised": _pretokenised,
        "classification": _classification}
