"""Sequence-classification jobs: a frozen head over the pooled hidden state, trained as a site.

In ColA the server holds no parameter gradient, so a classification head cannot be a trainable
module of the server's model. Instead the server's model carries a *frozen* head `score`
(a seeded random `nn.Linear(hidden, classes)`, as HF initialises one), and the job adapts it
like any other site, with a `linear` adapter (bias included): the job's head is `W0 + dW`, and
`dW` (with its bias) lives and trains on the device. Its gradient is the head's ordinary one, so
the trajectory equals backprop through the same head and adapters (tests/test_classify.py).

    model = classifier(tiny("llama"), classes=4)            # decoder: last non-pad token pooling
    model = classifier(load("minilm-l6")[0], classes=12)    # encoder: mean pooling (CLS: pooling="cls")
    spec = classification_job("acme", model, LowRank(r=8))  # body sites lowrank, head `score` linear
    probe = classification_job("probe", model, probe=True)  # the head alone: a linear probe
    trainer = Trainer(model, [spec, probe], loss_fn=seq_cls)

A job has one adapter spec, so the head's own kind rides in `WithHead`: body sites get `body`,
sites named in `head_sites` get `head` (by default a biased linear map). Any body kind works.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..adapters.base import AdapterSpec
from ..adapters.head import HEAD, WithHead
from ..adapters.lowrank import LowRank
from ..job import JobSpec
from ..sites import default_targets, family_of

__all__ = ["HEAD", "SequenceClassifier", "WithHead", "classification_job", "classification_spec", "classifier"]

POOLINGS = ("last", "mean", "cls")
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "deberta", "deberta-v2"}


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, C)
    features: torch.Tensor  # (B, H): the pooled hidden state the head reads (penultimate features)


class SequenceClassifier(nn.Module):
    """A frozen transformer body, a pooling, and a frozen head `score`: what a server holds for
    classification jobs. Every job trains its own head as an adapter on `score`."""

    def __init__(self, body: nn.Module, classes: int, pooling: str, seed: int = 0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(classes, int) or classes < 2:
            raise ValueError(f"`classes` must be an int >= 2, got {classes!r}")
        self.body, self.pooling, self.classes = body, pooling, classes
        hidden = body.config.hidden_size
        self.score = nn.Linear(hidden, classes)
        g = torch.Generator().manual_seed(seed)  # the same W0 wherever the server starts
        std = getattr(body.config, "initializer_range", 0.02)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(classes, hidden, generator=g) * std)
            self.score.bias.zero_()
        self.score.to(next(body.parameters()).dtype)
        self.requires_grad_(False)

    @property
    def config(self):  # the body's: family (default sites), vocabulary and context for the host
        return self.body.config

    def get_input_embeddings(self) -> nn.Module:
        return self.body.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> ClassifierOutput:
        """Logits and pooled features for a (B, T) batch; padding on either side."""
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, H)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T)
        if self.pooling == "cls":
            pooled = h[:, 0]  # (B, H)
        elif self.pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, H)
        else:  # last: the last real token, wherever the padding is (a decoder has seen everything there)
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # (B,)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return ClassifierOutput(self.score(pooled), pooled)


def classifier(model: nn.Module, classes: int, pooling: str | None = None, seed: int = 0) -> SequenceClassifier:
    """Wrap an HF model (causal LM, encoder, or *ForSequenceClassification) as a classifier body.

    Pooling defaults by architecture: `last` (the last non-pad token) for decoders, `mean` for
    encoders (what sentence encoders such as all-MiniLM-L6 were trained with).
    """
    body = getattr(model, "base_model", model)  # LlamaForCausalLM -> LlamaModel, Bert*ForX -> BertModel
    if not hasattr(body, "config") or not hasattr(body.config, "hidden_size"):
        raise TypeError(f"cannot find a transformer body with a `hidden_size` in {type(model).__name__}")
    if pooling is None:
        pooling = "mean" if family_of(body) in ENCODERS else "last"
    return SequenceClassifier(body, classes, pooling, seed).eval()


def classification_spec(spec: JobSpec, model: nn.Module | None) -> JobSpec:
    """`spec` as a job on `model` runs it: on a classifier, its head trains too (a plain adapter
    becomes the `body` of a `WithHead`, and listed targets that name no head site get the head's);
    a target regex is kept as given. On any other model: `spec` unchanged."""
    if not isinstance(model, SequenceClassifier) or spec.adapter.blackbox:
        return spec
    adapter = spec.adapter if isinstance(spec.adapter, WithHead) else WithHead(body=spec.adapter)
    targets = spec.target_modules
    if targets is None:
        targets = [*(adapter.body.default_targets(model) or default_targets(model)), *adapter.head_sites]
    elif not isinstance(targets, str) and not set(adapter.head_sites) & set(targets):
        targets = [*targets, *adapter.head_sites]
    return spec if (adapter, targets) == (spec.adapter, spec.target_modules) else \
        replace(spec, adapter=adapter, target_modules=targets)


def classification_job(job_id: str, model: nn.Module, adapter: AdapterSpec | None = None,
                       targets: list[str] | None = None, probe: bool = False, **job) -> JobSpec:
    """A JobSpec that trains `adapter` on the body's sites (the family's defaults unless `targets`)
    and a biased linear head on `score`; `probe=True`: the head alone (a linear probe)."""
    if isinstance(adapter, WithHead):
        spec = adapter
    else:
        spec = WithHead(body=adapter or LowRank())
    if probe:
        sites = list(spec.head_sites)
    else:
        if targets is None:
            targets = default_targets(model)
        sites = [*targets, *spec.head_sites]
    return JobSpec(job_id, spec, target_modules=sites, **job)
