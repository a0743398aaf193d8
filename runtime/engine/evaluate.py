"""Evaluation while training: eval loss, greedy exact match and a user metric on held-out rows.

An eval set travels in the job's data map (msgpack), as token rows like the training data:

    data["eval"] = eval_map(eval_data=rows, eval_prompts=qa_rows, every=25, patience=4)
    # -> {"examples": [...], "prompts": [...], "every": 25, "patience": 4}

Every `every` steps (steps 0, every, 2*every, ... and the last step) the driver — the server's
step loop or the in-process Trainer — runs `evaluate` right after that step's forward/backward,
with exactly the adapter versions the step used (version need(t)): forward only, no gradient,
no packet, no random draw, so a job trains bit for bit the same with or without eval. The
results go into that step's metrics map (`eval_loss`, `eval_exact_match`, a user metric's keys).

Rows of `prompts` are prompt + reference answer: `labels` are -100 over the prompt and equal to
`input_ids` over the answer (what `colaflow.studies.tasks.knowledge.encode` or a prompt/completion
dataset gives). Greedy decoding produces the reference exactly iff every answer token is the
argmax given the tokens before it, so exact match is one teacher-forced forward, not a decode loop.

An eval costs the tenant that asks for it: at most MAX_EVAL_ROWS rows and MAX_EVAL_TOKENS tokens
(both sets together; refused at submit past them), run as `Evaluation` slices of one batch each,
which the server's step loop counts in the job's share and runs between other jobs' steps.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..control.records import Watch
from ..data.batches import IGNORE, check_limits, stack, tensor_rows, to_map

# metric(predictions, references) -> {name: number}; both are lists of token-id lists
Metric = Callable[[list[list[int]], list[list[int]]], dict]
BATCH = 16  # rows per eval forward: one slice of an `Evaluation`
KEYS = ("examples", "prompts", "every", "patience")
MAX_EVAL_ROWS = 1024  # rows of one eval (examples and prompts together)
MAX_EVAL_TOKENS = 1024 * 128  # their tokens


@dataclass
class EvalSet:
    """A job's eval set: `examples` for eval_loss, `prompts` for exact match (and `metric`)."""

    examples: list[dict]  # 1-D tensors: input_ids, attention_mask, labels
    prompts: list[dict]
    every: int = 10
    patience: int | None = None  # evals without improvement before the job stops (None: never)
    metric: Metric | None = None  # in-process only: a server computes the built-in metrics

    @property
    def watch(self) -> Watch:
        """What ranks the evals: exact match (higher is better) when there are prompts, else eval loss."""
        if self.prompts:
            return Watch("eval_exact_match", True, self.patience)
        return Watch("eval_loss", False, self.patience)

    def due(self, step: int, steps: int | None) -> bool:
        """Whether step `step` of a `steps`-step job evaluates: every `every` steps, and the last one."""
        return step % self.every == 0 or (steps is not None and step == steps - 1)


def eval_map(eval_data: Iterable[dict] | None = None, eval_prompts: Iterable[dict] | None = None,
             every: int = 10, patience: int | None = None) -> dict | None:
    """The `eval` entry of a job's data map (None: no eval); refuses what a server would refuse."""
    if eval_data is None and eval_prompts is None:
        if patience is not None:
            raise ValueError("`patience` needs an eval set: pass `eval_data` or `eval_prompts`")
        return None
    out: dict = {"every": every}
    if patience is not None:
        out["patience"] = patience
    for key, name, source in (("examples", "eval_data", eval_data), ("prompts", "eval_prompts", eval_prompts)):
        if source is not None:
            try:
                out[key] = to_map(list(source))["examples"]
            except ValueError as e:
                raise ValueError(f"`{name}`: {e}") from None
    parse(out)
    return out


def parse(d: dict | None, vocab: int | None = None, context: int | None = None, causal: bool = True) -> EvalSet | None:
    """The eval set of a data map's `eval` entry (None: none), checked against the model's limits;
    `causal`: the job's loss is next-token prediction (exact match on prompts needs it)."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"`data.eval` must be a map, got {type(d).__name__}")
    if set(d) - set(KEYS):
        raise ValueError(f"unknown `data.eval` keys {sorted(set(d) - set(KEYS))}; known: {list(KEYS)}")
    every, patience = d.get("every", 10), d.get("patience")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"`eval_every` must be an int >= 1, got {every!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"`patience` must be an int >= 1 or None, got {patience!r}")
    rows = {}
    for key, name in (("examples", "eval_data"), ("prompts", "eval_prompts")):
        given = d.get(key)
        if given is None:
            rows[key] = []
            continue
        if not isinstance(given, list) or not given:
            raise ValueError(f"`{name}` must be a non-empty list of token rows")
        same = key == "prompts" and given == d.get("examples")  # the same rows: shared, checked once
        rows[key] = rows["examples"] if same else tensor_rows(given, name)  # malformed rows refused here
        check_limits({"examples": given}, vocab, context, name)
    if rows["prompts"] and not causal:
        raise ValueError("`eval_prompts` need a causal language model (greedy answers); use `eval_data` for this loss")
    if not rows["examples"] and not rows["prompts"]:
        raise ValueError("`data.eval` needs `examples` (eval_data) or `prompts` (eval_prompts)")
    shared = rows["prompts"] is rows["examples"]
    counted = rows["examples"] + ([] if shared else rows["prompts"])
    tokens = sum(len(r["input_ids"]) for r in counted)
    if len(counted) > MAX_EVAL_ROWS or tokens > MAX_EVAL_TOKENS:
        raise ValueError(f"the eval set holds {len(counted)} rows of {tokens} tokens; one eval may take at most "
                         f"{MAX_EVAL_ROWS} rows and {MAX_EVAL_TOKENS} tokens (every `eval_every` steps): "
                         "sample it down")
    if rows["examples"] and not any(bool((r["labels"] != IGNORE).any()) for r in rows["examples"]):
        raise ValueError("`eval_data` has no labelled token: eval loss would be 0/0")
    for i, row in enumerate(rows["prompts"]):
        answer_start(row, f"eval_prompts[{i}]")
    return EvalSet(rows["examples"], rows["prompts"], every, patience)


def answer_start(row: dict, where: str = "eval prompt") -> int:
    """Where a prompt row's reference answer begins; raises unless labels are -100 then the answer."""
    ids, labels = row["input_ids"], row["labels"]  # (T,), (T,)
    labelled = labels != IGNORE
    if not bool(labelled.any()):
        raise ValueError(f"`{where}` has no answer: label the reference tokens (labels -100 over the prompt only)")
    start = int(labelled.nonzero()[0])
    if start == 0:
        raise ValueError(f"`{where}` has no prompt: its labels must be -100 over the prompt, then the answer")
    if not bool(labelled[start:].all()) or not torch.equal(labels[start:], ids[start:]):
        raise ValueError(f"`{where}`: labels must be -100 over the prompt, then equal `input_ids` over the answer")
    return start


@contextlib.contextmanager
def _forward_only(model: torch.nn.Module):
    """No gradient, dropout off, the random state left as it was: an eval never moves the training run."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(training)


def _batches(rows: list[dict], device: torch.device) -> Iterator[dict]:
    for i in range(0, len(rows), BATCH):
        yield {k: v.to(device) for k, v in stack(rows[i:i + BATCH]).items()}  # (B, T) each, right-padded


def _forward(host, job_id: str, batch: dict):
    with host.using(job_id) as model:  # this job's adapters at the versions the host holds now
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def evaluate(host, job_id: str, ev: EvalSet) -> dict[str, float]:
    """`eval_loss` (token-weighted over `examples`), `eval_exact_match` (over `prompts`) and the user
    metric's keys, with the adapters `host` holds for `job_id` now; forward only."""
    run = Evaluation(ev)
    while not run.step(host, job_id):
        pass
    return run.result


class Evaluation:
    """One eval of a job, a batch at a time: `step` runs the next slice (True once all have run; then
    `result` holds the metrics). The host must hold the same adapters for the job throughout."""

    def __init__(self, ev: EvalSet):
        self.ev, self.result = ev, {}
        shared = ev.examples is ev.prompts  # the same rows (as in the demo): one forward gives both metrics
        self._slices = [(ev.examples, i, True, shared) for i in range(0, len(ev.examples), BATCH)]
        if not shared:
            self._slices += [(ev.prompts, i, False, True) for i in range(0, len(ev.prompts), BATCH)]
        self._next, self._total, self._count, self._hits = 0, 0.0, 0, 0

    def step(self, host, job_id: str) -> bool:
        """Run the next slice; True when the eval is complete (`result` is set)."""
        if self._next < len(self._slices):
            rows, i, loss, match = self._slices[self._next]
            device = next(host.model.parameters()).device
            with _forward_only(host.model):
                batch = next(_batches(rows[i:i + BATCH], device))
                output = _forward(host, job_id, batch)
                if loss:
                    row_sum, row_count = host.loss_fn(output, batch)  # (B,), (B,)
                    self._total += float(row_sum.double().sum())
                    self._count += int(row_count.sum())
                if match:
                    guess = output.logits.argmax(-1)[:, :-1]  # (B, T-1): the greedy next token
                    want = batch["labels"][:, 1:]  # (B, T-1): the answer's tokens, IGNORE elsewhere
                    self._hits += int(((guess == want) | (want == IGNORE)).all(1).sum())
            self._next += 1
            if self._next < len(self._slices) or self.ev.metric is not None:
                return False
        self.result = self._finish(host, job_id)
        return True

    def _finish(self, host, job_id: str) -> dict[str, float]:
        ev, out = self.ev, {}
        if ev.examples:
            if self._count == 0:
                raise ValueError("`eval_data` has no labelled token the loss counts")
            out["eval_loss"] = self._total / self._count
        if ev.prompts:
            out["eval_exact_match"] = self._hits / len(ev.prompts)
        if ev.metric is not None:  # in-process only: greedy decoding, then the user's metric (one slice)
            refs = [r["input_ids"][answer_start(r):].tolist() for r in ev.prompts]
            out.update(_user_metric(ev.metric, greedy(host, job_id, ev.prompts), refs))
        return out


def greedy(host, job_id: str, prompts: list[dict]) -> list[list[int]]:
    """Greedy continuation of each prompt row, as many tokens as its reference answer has.

    Prompts of one length run as one batch (no padding, so any causal LM's positions are right).
    """
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(prompts):
        groups.setdefault(answer_start(row), []).append(i)
    device = next(host.model.parameters()).device
    with _forward_only(host.model):
        for start, idx in groups.items():
            ids = torch.stack([prompts[i]["input_ids"][:start] for i in idx]).to(device)  # (B, P)
            for _ in range(max(len(prompts[i]["input_ids"]) - start for i in idx)):
                logits = _forward(host, job_id, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)  # (B, P + k + 1)
            for j, i in enumerate(idx):
                out[i] = ids[j, start:len(prompts[i]["input_ids"])].tolist()
    return out


def _user_metric(metric: Metric, predictions: list[list[int]], references: list[list[int]]) -> dict[str, float]:
    """Call the user's metric; its keys come back prefixed `eval_` (so charts pick them up)."""
    got = metric(predictions, references)
    if not isinstance(got, dict):
        raise TypeError(f"`metric` must return a dict of name -> number, got {type(got).__name__}")
    out = {}
    for k, v in got.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise TypeError(f"`metric` returned {k!r}: {v!r}; it must map names to finite numbers")
        out[k if k.startswith("eval_") else f"eval_{k}"] = float(v)
    return out
