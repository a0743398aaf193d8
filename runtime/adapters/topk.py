"""The black-box packet layout (Easy Adaptation): a large model's top-k log-probs per token.

A black-box job has one site, `<output>`; its packet carries no hidden state and no gradient,
only what the large model predicts, dense over the batch's (B, T) positions:

    x: (B, T, 2 + k) int32   [input token id, label of that position (IGNORE: none), top-k vocab ids]
    g: (B, T, k + 1) float32 [top-k log-probs, log of the tail mass 1 - sum(exp(top-k))]

The device rebuilds the base log-probs: the top-k tokens keep theirs, every other token gets
`tail - log(V - k)` (the rest of the mass spread uniformly). That is 8k + 12 bytes per token,
whatever the vocabulary. Exact mode (`top_k=0`): x is (B, T, 2) and g (B, T, V), the full log-probs.
The server encodes (`colaflow.engine.blackbox`), the device's `SmallLM` decodes.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..data.batches import IGNORE
from ..sites import Site

OUTPUT = "<output>"  # the one site of a black-box job
MIN_TAIL = 1e-12  # the tail mass is clamped here: top-k sums computed in floats may reach 1

# (input_ids (B, T), attention_mask (B, T) or None, k) -> (values (B, T, k) log-probs, largest first;
# indices (B, T, k) vocabulary ids). All a black-box server needs of the large model.
LogProbs = Callable[[torch.Tensor, "torch.Tensor | None", int], tuple[torch.Tensor, torch.Tensor]]


def model_logprobs(model: nn.Module) -> LogProbs:
    """A `LogProbs` over a causal LM: one forward under no_grad, then top-k of log_softmax."""

    def logprobs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, k: int):
        device = next(model.parameters()).device  # the batch may be on the host: ids go to the model,
        with torch.no_grad():                      # the answer comes back to the batch's device
            mask = None if attention_mask is None else attention_mask.to(device)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask).logits  # (B, T, V)
            lp = torch.log_softmax(logits.float(), -1)
            del logits
            if k >= lp.shape[-1]:  # exact: every token, in vocabulary order
                values, indices = lp, torch.arange(lp.shape[-1], device=lp.device).expand(lp.shape)
            else:
                values, indices = lp.topk(k, dim=-1)  # (B, T, k) each, largest first
            return values.to(input_ids.device), indices.to(input_ids.device)
    return logprobs


def output_site(vocab: int, top_k: int) -> Site:
    """The `<output>` site: in_features is the vocabulary, out_features the width of g per token."""
    if not 0 <= top_k < vocab:
        raise ValueError(f"`top_k` must be in [0, {vocab}) for a vocabulary of {vocab} (0: exact), got {top_k}")
    return Site(OUTPUT, "embedding", vocab, vocab if top_k == 0 else top_k + 1)


def encode(ids: torch.Tensor, labels: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
           vocab: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, g) of a packet from the inputs, the shifted labels and the large model's top-k log-probs."""
    live = labels != IGNORE  # (B, T)
    if top_k == 0:
        g = torch.empty((*ids.shape, vocab), dtype=torch.float32, device=values.device)
        g.scatter_(-1, indices.long(), values.float())  # (B, T, V) in vocabulary order
        x = torch.stack([ids, labels], -1)  # (B, T, 2)
    else:
        values, indices = values[..., :top_k].float(), indices[..., :top_k]  # (B, T, k)
        mass = values.double().exp().sum(-1)  # (B, T): the top-k's share, in float64
        tail = torch.log1p(-mass.clamp(max=1 - MIN_TAIL)).float()  # (B, T): log of what is left
        g = torch.cat([values, tail.unsqueeze(-1)], -1)  # (B, T, k + 1)
        x = torch.cat([ids.unsqueeze(-1), labels.unsqueeze(-1), indices.to(ids.dtype)], -1)  # (B, T, 2 + k)
    g = g.clamp_min(-1e4).masked_fill(~live.unsqueeze(-1), 0.0)  # -inf log-probs would fail the packet check
    x = x.masked_fill(~live.unsqueeze(-1), 0)
    x[..., 0], x[..., 1] = ids, labels
    return x.to(torch.int32), g


def decode(x: torch.Tensor, g: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(live (B, T) mask, labels (N,), base log-probs (N, V)) of a packet's N labelled tokens."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"site `{OUTPUT}`: `x` {tuple(x.shape)} and `g` {tuple(g.shape)} must be (B, T, ...) alike")
    exact = x.shape[-1] == 2
    k = x.shape[-1] - 2
    if (exact and g.shape[-1] != vocab) or (not exact and g.shape[-1] != k + 1):
        raise ValueError(f"site `{OUTPUT}`: `x` carries {k} indices per token but `g` has width {g.shape[-1]}")
    live = x[..., 1] != IGNORE  # (B, T)
    labels = x[..., 1][live].long()  # (N,)
    if labels.numel() and (labels.min() < 0 or labels.max() >= vocab):
        raise ValueError(f"site `{OUTPUT}`: a label is outside the vocabulary [0, {vocab})")
    if exact:
        return live, labels, g[live].float()  # (N, V)
    idx = x[..., 2:][live].long()  # (N, k)
    if idx.numel() and (idx.min() < 0 or idx.max() >= vocab):
        raise ValueError(f"site `{OUTPUT}`: a top-k index is outside the vocabulary [0, {vocab})")
    rows = g[live].float()  # (N, k + 1)
    fill = rows[:, k] - math.log(vocab - k)  # (N,): each tail token's share of the tail mass
    base = fill.unsqueeze(1).expand(len(fill), vocab).clone()  # (N, V)
    return live, labels, base.scatter_(1, idx, rows[:, :k])


def label_logprob(x: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T) the base log-prob of each position's label under the packet's representation (0: none);
    O(k) per token, so the server can report the large model's own loss without a (N, V) tensor."""
    labels = x[..., 1].long()  # (B, T)
    if x.shape[-1] == 2:
        out = g.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    else:
        k = x.shape[-1] - 2
        hit = x[..., 2:].long() == labels.unsqueeze(-1)  # (B, T, k)
        fill = g[..., k] - math.log(vocab - k)
        out = torch.where(hit.any(-1), (g[..., :k] * hit).sum(-1), fill)
    return out.masked_fill(labels == IGNORE, 0.0)
