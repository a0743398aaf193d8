"""The causal-LM loss fused with the model's head: the step keeps no (B, T, V) tensor.

Autograd keeps the log-softmax of every position's logits (B x T x V floats: 192 MiB for
SmolLM2 at 8 x 128) from the end of the forward into the backward, and the backward makes a
second one. The loss's gradient with respect to the logits is known in the forward, so
`HeadLoss` makes dL/dh there, a chunk of tokens at a time, and keeps only that (B, T, H):

    row_sum[b]           = sum_t lse(W h[b,t] + c) - (W h[b,t] + c)[y[b,t]]
    d row_sum[b]/d h[b,t] = (softmax(W h[b,t] + c) - onehot(y[b,t])) W

Same FLOPs as autograd's forward and backward; memory is one chunk's logits. It serves models
whose logits are their output embedding's output, unchanged (`fusable` checks that once per
model: no soft-capping or scaling after the head), and the plain causal-LM loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loss import IGNORE

CHUNK = 256  # tokens per chunk: 256 x V floats of logits at a time (48 MiB at V = 49152)


class HeadLoss(torch.autograd.Function):
    """(h (B, T, H), weight (V, H), bias (V,) | None, labels (B, T)) -> per-row loss sums (B,)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels):
        B, T, H = h.shape
        flat, y = h.reshape(-1, H), labels.reshape(-1)
        sums = torch.zeros(B * T, dtype=torch.float32, device=h.device)
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        for s in range(0, B * T, CHUNK):
            yy = y[s:s + CHUNK]
            live = yy != IGNORE
            if not h.is_cuda and not bool(live.any()):
                continue  # no label here (a prompt, padding): zero loss, zero gradient
            logits = F.linear(flat[s:s + CHUNK], weight, bias).float()  # (n, V)
            lse = torch.logsumexp(logits, -1)
            target = yy.clamp(min=0).unsqueeze(1)
            sums[s:s + CHUNK] = torch.where(live, lse - logits.gather(1, target).squeeze(1), 0.0)
            if grad is not None:  # no host sync on a GPU: masks, not indices
                p = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' own memory
                p.scatter_add_(1, target, torch.full_like(lse, -1.0).unsqueeze(1)).mul_(live.unsqueeze(1))
                grad[s:s + CHUNK] = p.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.shape = (B, T, H)
        return sums.view(B, T).sum(1)

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        B, T, H = ctx.shape
        return grad.view(B, T, H) * grad_rows.to(grad.dtype).view(B, 1, 1), None, None, None


def head_of(model: nn.Module) -> nn.Linear | None:
    """The model's output embedding, when the loss can be fused with it (see the module doc)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear:
        return None
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=head.weight.device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception:  # a model that needs other inputs: not fused, never wrong
        return None
    finally:
        handle.remove()
    logits = getattr(out, "logits", None)
    return head if len(seen) == 1 and logits is seen[0] else None


class fused:
    """`with fused(head, labels) as f: model(**inputs)`: the head returns a stand-in (an expanded
    zero, no memory) and `f.rows` holds (per-row loss sums, per-row token counts)."""

    def __init__(self, head: nn.Linear, labels: torch.Tensor):
        self.head = head
        self.labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts t+1, as causal_lm
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self):
        def forward(h):
            if h.dim() != 3 or tuple(h.shape[:2]) != tuple(self.labels.shape):
                raise RuntimeError(f"the fused head got hidden states of shape {tuple(h.shape)} for labels "
                                   f"{tuple(self.labels.shape)}")
            sums = HeadLoss.apply(h, self.head.weight, self.head.bias, self.labels)
            self.rows = (sums, (self.labels != IGNORE).sum(1))
            return h.new_zeros(()).expand(*h.shape[:-1], self.head.out_features)
        self.head.forward = forward
        return self

    def __exit__(self, *exc):
        del self.head.forward  # the class's own forward again
