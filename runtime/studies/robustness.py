"""Does adaptation cost OOD robustness? Train a classifier per adapter kind and score OOD detection.

For the intent task (`colaflow.studies.tasks.intents`: 12 in-distribution intents, 3 held-out intents as
OOD), trains one classification job per adapter kind (head + adapters on the body's sites) and a
linear probe (the head alone on the frozen body: the base model's row), all in one in-process
`Trainer` (one mixed forward per step), then reports per model: in-distribution test accuracy and
AUROC / FPR@95 of the MSP, energy and Mahalanobis scores (Cho et al., "Probing Out-of-Distribution
Robustness of Language Models with Parameter-Efficient Transfer Learning", 2023).

    rows = evaluate(model="minilm-l6", kinds=["lowrank"], steps=150)
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..adapters.base import AdapterSpec, adapter_kinds
from ..control.trainer import Trainer
from ..data.batches import from_map, stack, to_map
from ..engine.classify import SequenceClassifier, classification_job, classifier
from ..engine.loss import seq_cls
from ..learn.optim import AdamW, Schedule
from .ood import Mahalanobis, auroc, energy, fpr_at_95, msp
from .tasks.intents import encode, make_intents

BASE = "base"
SCORES = ("msp", "energy", "mahalanobis")
ALIASES = {"lora": "lowrank"}


@dataclass
class Row:
    """One model's line of the table."""

    model: str  # "base" (frozen body, linear-probe head) or the adapter kind
    accuracy: float  # in-distribution test accuracy
    auroc: dict[str, float] = field(default_factory=dict)  # per score
    fpr95: dict[str, float] = field(default_factory=dict)
    trainable: int = 0  # parameters the devices train (head included)

    def to_dict(self) -> dict:
        return {"model": self.model, "accuracy": self.accuracy, "auroc": self.auroc, "fpr95": self.fpr95,
                "trainable": self.trainable}


def resolve_kinds(kinds: list[str], say: Callable[[str], None] = print) -> list[str]:
    """The registered adapter kinds among `kinds` (aliases: lora); says which it skips and why."""
    out = []
    for k in kinds:
        k = ALIASES.get(k, k)
        if k not in adapter_kinds() or k == "with_head":
            say(f"colaflow eval: skipping adapter kind {k!r}: not registered here (known: "
                f"{[x for x in adapter_kinds() if x != 'with_head']})")
        elif k not in out:
            out.append(k)
    return out


@torch.no_grad()
def _outputs(trainer: Trainer, job: str, rows: list[dict], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), features (N, H)) of `job`'s adapted model over `rows`."""
    logits, feats = [], []
    for i in range(0, len(rows), batch):
        b = stack(rows[i:i + batch])
        with trainer.host.using(job) as model:  # one forward per `using`
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits.append(out.logits.float())
        feats.append(out.features.float())
    return torch.cat(logits), torch.cat(feats)


def score_table(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                ood: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict, dict]:
    """(accuracy, AUROC per score, FPR@95 per score) from (logits, features[, labels]) of train, test and OOD."""
    (_, train_f, train_y), (test_l, test_f, test_y), (ood_l, ood_f) = train, test, ood
    maha = Mahalanobis.fit(train_f, train_y)
    scorers = {"msp": lambda logits, f: msp(logits), "energy": lambda logits, f: energy(logits),
               "mahalanobis": lambda logits, f: maha(f)}
    aurocs, fprs = {}, {}
    for name, s in scorers.items():
        ind, out = s(test_l, test_f), s(ood_l, ood_f)
        aurocs[name], fprs[name] = auroc(ind, out), fpr_at_95(ind, out)
    accuracy = float((test_l.argmax(-1) == test_y).double().mean())
    return accuracy, aurocs, fprs


def evaluate(model: str | SequenceClassifier = "minilm-l6", kinds: list[str] = ("lowrank",), steps: int = 120,
             batch_size: int = 16, lr: float = 5e-3, probe_lr: float = 1e-2, seed: int = 0, tokenizer=None,
             targets: list[str] | None = None,
             say: Callable[[str], None] = print, progress: bool = False) -> list[Row]:
    """Train a linear probe and one classification job per adapter kind on the intent task; score them.

    `model`: a name for `colaflow.models.load` (wrapped with `classify.classifier`), or a ready
    `SequenceClassifier` with `tokenizer`. Kinds not registered here are skipped with a message; each
    kind adapts `targets` (default: the model family's sites) with its default spec.
    """
    data = make_intents(seed=seed)
    if isinstance(model, str):
        from ..models import load

        body, tokenizer = load(model, verbose=False)
        model = classifier(body, len(data.intents))
    if tokenizer is None:
        raise ValueError("pass the `tokenizer` that goes with a ready `model`")
    if model.classes != len(data.intents):
        raise ValueError(f"the model has {model.classes} classes; the task has {len(data.intents)} intents")
    kinds = resolve_kinds(list(kinds), say)
    train, test, ood = encode(tokenizer, data.train), encode(tokenizer, data.test), encode(tokenizer, data.ood)
    say(f"colaflow eval: {len(data.intents)} intents ({len(train)} train, {len(test)} test), "
        f"{len(data.ood_intents)} OOD intents ({len(ood)} utterances: {', '.join(data.ood_intents)})")

    def schedule() -> Schedule:
        return Schedule("linear", warmup=max(1, steps // 10), total=steps)

    jobs = [classification_job(BASE, model, probe=True, optimizer=AdamW(lr=probe_lr, schedule=schedule()), seed=seed)]
    jobs += [classification_job(k, model, AdapterSpec.from_dict({"kind": k}), targets=targets,
                                optimizer=AdamW(lr=lr, schedule=schedule()), seed=seed) for k in kinds]
    trainer = Trainer(model, jobs, loss_fn=seq_cls)
    t0 = time.perf_counter()
    trainer.run({j.job_id: from_map(to_map(train, batch_size, seed)) for j in jobs}, steps, progress=progress)
    say(f"colaflow eval: trained {len(jobs)} jobs x {steps} steps (batch {batch_size}) in "
        f"{time.perf_counter() - t0:.0f} s; final losses "
        + ", ".join(f"{j}={h[-1]:.3f}" for j, h in trainer.history.items()))

    def tensors(rs: list[dict]) -> list[dict]:
        return [{"input_ids": torch.tensor(r["input_ids"]),
                 "attention_mask": torch.ones(len(r["input_ids"]), dtype=torch.long)}
                for r in rs]

    train_y = torch.tensor([r["label"] for r in train])
    test_y = torch.tensor([r["label"] for r in test])
    out = []
    for job in trainer.specs:
        tl, tf = _outputs(trainer, job, tensors(train))
        sl, sf = _outputs(trainer, job, tensors(test))
        ol, of = _outputs(trainer, job, tensors(ood))
        acc, aurocs, fprs = score_table((tl, tf, train_y), (sl, sf, test_y), (ol, of))
        n = sum(p.numel() for a in trainer.adapters(job).values() for p in a.parameters())
        out.append(Row(job, acc, aurocs, fprs, n))
    return out


def format_table(rows: list[Row]) -> str:
    """A plain-text table: model x trainable parameters, ID accuracy, AUROC and FPR@95 (in %) per score."""
    names = {"msp": "MSP", "energy": "Energy", "mahalanobis": "Mahalanobis"}
    top = f"{'':<10} {'':>9} {'':>7} | " + " | ".join(f"{names[s]:^13}" for s in SCORES)
    head = f"{'model':<10} {'params':>9} {'ID acc':>7} | " + " | ".join(f"{'AUROC':>6} {'FPR95':>6}" for _ in SCORES)
    lines = [top.rstrip(), head, "-" * len(head)]
    for r in rows:
        cells = " | ".join(f"{100 * r.auroc[s]:>6.1f} {100 * r.fpr95[s]:>6.1f}" for s in SCORES)
        lines.append(f"{r.model:<10} {r.trainable:>9} {100 * r.accuracy:>7.1f} | {cells}")
    return "\n".join(lines)
