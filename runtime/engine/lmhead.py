"""The causal-LM loss fused with the model's head: the step keeps no (B, T, V) tensor.

Autograd keeps the log-softmax of every position's logits (B x T x V floats: 192 MiB for
SmolLM2 at 8 x 128) from the end of the forward into the backward, and the backward makes a
second one. The loss's gradient with respect to the logits is known in the forward, so
`HeadLoss` makes dL/dh there, a chunk of tokens at a time, and keeps only that (B, T, H):

    row_sum[b]           = sum_t lse(W h[b,t] + c) - (W h[b,t] + c)[y[b,t]]
    d row_sum[b]/d h[b,t] = (softmax(W h[b,t] + c) - onehot(y[b,t])) W

Same FLOPs as autograd's forward and backward; memory is one chunk's logits. It serves models
whose logits are their output embedding's output, unchanged (`head_of` checks that once per
model: no soft-capping or scaling after the head), and the plain causal-LM loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import IGNORE
from .loss import job_tokens, next_token_labels

CHUNK = 128  # tokens per chunk: 128 x V floats at a time (24 MiB each at V = 49152)


class HeadLoss(torch.autograd.Function):
    """(h (B, T, H), weight (V, H), bias (V,) | None, labels (B, T), scale (B,)) -> scale * per-row
    loss sums (B,). `scale` is each row's job's 1 / labelled tokens: applied to the gradient before
    the head's matmul, as autograd would, so the gradient is autograd's to the last bit."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, scale):
        B, T, H = h.shape
        flat, y = h.reshape(-1, H), labels.reshape(-1)
        if not h.is_cuda and bool(((y < 0) & (y != IGNORE)).any()):  # (Host checks every device's; here it would sync)
            raise IndexError(f"labels hold a negative token id other than {IGNORE}")
        s = scale.repeat_interleave(T)  # (B*T,) each token's row scale (float32)
        sums = torch.zeros(B * T, dtype=torch.float32, device=h.device)
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        for i in range(0, B * T, CHUNK):
            yy, ss = y[i:i + CHUNK], s[i:i + CHUNK]
            live = yy != IGNORE
            if not h.is_cuda and not bool(live.any()):
                continue  # no label here (a prompt, padding): zero loss, zero gradient
            out = torch.log_softmax(F.linear(flat[i:i + CHUNK], weight, bias).float(), -1)  # (n, V)
            target = yy.clamp(min=0).unsqueeze(1)
            sums[i:i + CHUNK] = torch.where(live, -out.gather(1, target).squeeze(1), 0.0)
            if grad is not None:  # s (softmax - onehot) through autograd's own kernels: its gradient to the bit
                nll = torch.zeros_like(out).scatter_(1, target, (-ss * live).unsqueeze(1))  # nll_loss's backward
                g = torch._log_softmax_backward_data(nll, out, 1, out.dtype)
                grad[i:i + CHUNK] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.shape = (B, T, H)
        return sums.view(B, T).sum(1) * scale

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        B, T, H = ctx.shape
        return grad.view(B, T, H) * grad_rows.to(grad.dtype).view(B, 1, 1), None, None, None, None


def head_of(model: nn.Module) -> nn.Linear | None:
    """The model's output embedding, when the loss can be fused with it (see the module doc)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear:
        return None
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.extend([out, out.clone()]))
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=head.weight.device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception:  # a model that needs other inputs: not fused, never wrong
        return None
    finally:
        handle.remove()
    logits = getattr(out, "logits", None)
    # the very tensor the head made, and with the head's values (not changed in place after it)
    return head if len(seen) == 2 and logits is seen[0] and torch.equal(logits, seen[1]) else None


class fused:
    """`with fused(head, labels, rows) as f: model(**inputs)`: the head returns a stand-in (an
    expanded zero, no memory) and `f.losses` holds each job's mean loss over its own tokens;
    `rows` is {job: row indices}, as `colaflow.engine.loss.per_job` takes it."""

    def __init__(self, head: nn.Linear, labels: torch.Tensor, rows: dict[str, torch.Tensor]):
        self.head, self.rows = head, rows
        self.labels = next_token_labels(labels)  # as causal_lm
        self.scale = torch.zeros(len(labels), dtype=torch.float32, device=labels.device)
        for job, count in job_tokens((self.labels != IGNORE).sum(1), rows).items():
            self.scale[rows[job]] = 1.0 / count.float()  # what autograd's d(sum / count) would be
        self.losses: dict[str, torch.Tensor] | None = None

    def __enter__(self):
        def forward(h):
            if h.dim() != 3 or tuple(h.shape[:2]) != tuple(self.labels.shape):
                raise RuntimeError(f"the fused head got hidden states of shape {tuple(h.shape)} for labels "
                                   f"{tuple(self.labels.shape)}")
            dev = self.head.weight.device  # a device-mapped head may sit on another device than h
            scaled = HeadLoss.apply(h.to(dev), self.head.weight, self.head.bias, self.labels.to(dev),
                                    self.scale.to(dev))
            self.losses = {job: scaled[idx.to(scaled.device)].sum() for job, idx in self.rows.items()}
            return h.new_zeros(()).expand(*h.shape[:-1], self.head.out_features)
        self.own = self.head.__dict__.get("forward")  # a wrapper someone set on the instance (accelerate's hooks)
        self.head.forward = forward
        return self

    def __exit__(self, *exc):
        if self.own is None:
            del self.head.forward  # the class's own forward again
        else:
            self.head.forward = self.own
