"""The device's model of black-box mode: a small causal LM added to the large model's log-probs.

    spec = JobSpec("acme", SmallLM(top_k=8, hidden=64, layers=1))   # the job's one site: `<output>`
    combined = base_logprobs + gate(h) * small(ids)                 # (N, V), gate = 1 without `gate`
    loss = cross_entropy(combined, labels)                          # mean over the packet's labelled tokens

Its "fit" is ordinary backprop of that loss (`SmallLMAdapter.objective`), called by `colaflow.learn.fit.fit`
as every kind's fit is, so the scheduler, worker, checkpoints and transports carry it unchanged.
The head starts at zero: before the first fit the combination is the large model alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..sites import Site
from .base import MAX_LAYERS, Adapter, AdapterSpec, register_adapter
from .topk import LogProbs, decode, encode, model_logprobs


@dataclass(frozen=True)
class SmallLM(AdapterSpec):
    """Black-box output mode (Easy Adaptation): a small LM whose logits add to the large model's."""

    kind: ClassVar[str] = "smalllm"
    blackbox: ClassVar[bool] = True  # the server runs a forward only (colaflow.engine.blackbox)
    top_k: int = 8  # log-probs per token the server sends; 0 = all of them (exact, V floats per token)
    hidden: int = 64
    layers: int = 1  # GRU layers for causal context; 0 = a per-token MLP (bigram-like)
    gate: bool = False  # a learned per-token gate in (0, 1) on the small model's logits
    dropout: float = 0.0  # kept for the AdapterSpec contract; black-box fits are deterministic, so 0

    def __post_init__(self):
        for name, low, high in (("top_k", 0, 1 << 20), ("hidden", 1, 1 << 13), ("layers", 0, MAX_LAYERS)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise ValueError(f"`{name}` must be an int in [{low}, {high}], got {v!r}")
        if self.dropout != 0.0:
            raise ValueError(f"`dropout` must be 0 for smalllm (the server has no adapter input to drop), "
                             f"got {self.dropout!r}")


class SmallLMAdapter(Adapter):
    """Embedding -> GRU layers (causal) -> head over the vocabulary; `forward(ids) -> (B, T, V)`."""

    def __init__(self, spec: SmallLM, site: Site):
        super().__init__(spec, site)
        vocab, h = site.in_features, spec.hidden
        want = vocab if spec.top_k == 0 else spec.top_k + 1
        if site.out_features != want:
            raise ValueError(f"site `{site.name}` carries {site.out_features} values per token; "
                             f"smalllm with `top_k` {spec.top_k} expects {want}")
        self.embed = nn.Embedding(vocab, h)
        self.rnn = nn.GRU(h, h, spec.layers, batch_first=True) if spec.layers else None
        self.mix = nn.Linear(h, h)
        self.head = nn.Linear(h, vocab)
        nn.init.zeros_(self.head.weight)  # starts as the identity: combined = the large model alone
        nn.init.zeros_(self.head.bias)
        self.gate = nn.Linear(h, 1) if spec.gate else None

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) causal features (right padding never reaches real tokens)."""
        h = self.embed(ids.long())  # (B, T, H)
        if self.rnn is not None:
            h = self.rnn(h)[0]  # (B, T, H)
        return F.gelu(self.mix(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V): what is added to the base log-probs (gated if the spec says so)."""
        s = self.head(h)  # (..., V)
        return s if self.gate is None else torch.sigmoid(self.gate(h)) * s

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(ids))  # (B, T, V)

    def objective(self, x: torch.Tensor, g: torch.Tensor) -> float:
        """Backprop the combined cross-entropy of one packet into the parameters; returns the loss."""
        live, labels, base = decode(x, g, self.site.in_features)  # (B, T), (N,), (N, V)
        h = self.hidden(x[..., 0])[live]  # (N, H): only labelled positions reach the head
        loss = F.cross_entropy(base + self.logits(h), labels)
        loss.backward()
        return float(loss.detach())


register_adapter(SmallLM, SmallLMAdapter)


def combined_logprobs(small: SmallLMAdapter, base: LogProbs, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) log-probs of the combination at every position, under the spec's representation."""
    spec: SmallLM = small.spec
    vocab = small.site.in_features
    k = spec.top_k or vocab
    values, indices = base(input_ids, attention_mask, k)
    every = torch.zeros_like(input_ids)  # a label at every position: decode rebuilds them all
    x, g = encode(input_ids, every, values, indices, vocab, spec.top_k)
    live, _, lp = decode(x, g, vocab)  # (N = B*T, V)
    with torch.no_grad():
        s = small(input_ids.to(next(small.parameters()).device))  # (B, T, V)
    return torch.log_softmax(lp.view(*input_ids.shape, vocab) + s.to(lp.device), -1)


@torch.no_grad()
def generate(base: LogProbs | nn.Module, small: SmallLMAdapter, input_ids: torch.Tensor,
             max_new_tokens: int = 16, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding from the combination; `base` is a causal LM or an API-style `LogProbs`.

    Rows must not be left-padded (the small model reads tokens in order): pass one prompt, or prompts
    of one length. Returns (B, T + new) ids; each step re-reads the whole prefix (no KV cache).
    """
    logprobs = model_logprobs(base) if isinstance(base, nn.Module) else base
    ids = input_ids
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = combined_logprobs(small, logprobs, ids)[:, -1].argmax(-1)  # (B,)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt.unsqueeze(1).to(ids.dtype)], 1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


__all__ = ["SmallLM", "SmallLMAdapter", "combined_logprobs", "generate"]
