"""Black-box output mode (Easy Adaptation): the server runs only a forward, the device learns on top.

A black-box job has one site, `<output>`, whose adapter is a small model on the device
(`colaflow.smalllm.SmallLM`). Its logits are added to the large model's log-probs; the device
trains it on the cross-entropy of that combination by ordinary backprop. The server runs the base
model's forward under `torch.no_grad()` (no backward at all), or just calls an API-style
`logprobs(input_ids, attention_mask, k) -> (values, indices)`: top-k log-probs, largest first.

    host = BlackBoxHost(logprobs, vocab_size=V)       # no torch model needed (an API, a remote LM)
    host.add_job(JobSpec("acme", SmallLM(top_k=8)))   # or Host(model).add_job(...): it routes here
    result = host.step(batch)                         # one Packet per job, site `<output>`

Packet layout, dense over the batch's (B, T) positions (so positions are implicit):

    x: (B, T, 2 + k) int32   [input token id, label of that position (IGNORE: none), top-k vocab ids]
    g: (B, T, k + 1) float32 [top-k log-probs, log of the tail mass 1 - sum(exp(top-k))]

The device rebuilds the base log-probs: the top-k tokens keep theirs, every other token gets
`tail - log(V - k)` (the rest of the mass spread uniformly). That is 8k + 12 bytes per token,
whatever the vocabulary. Exact mode (`top_k=0`): x is (B, T, 2) and g (B, T, V), the full log-probs.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gl import Packet, Update
from .job import JobSpec
from .loss import IGNORE
from .sites import Site

OUTPUT = "<output>"  # the one site of a black-box job
MIN_TAIL = 1e-12  # the tail mass is clamped here: top-k sums computed in floats may reach 1

# (input_ids (B, T), attention_mask (B, T) or None, k) -> (values (B, T, k) log-probs, largest first;
# indices (B, T, k) vocabulary ids). All a black-box server needs of the large model.
LogProbs = Callable[[torch.Tensor, "torch.Tensor | None", int], tuple[torch.Tensor, torch.Tensor]]


def is_blackbox(spec: JobSpec) -> bool:
    """Whether a job runs in black-box output mode (its adapter kind says so)."""
    return bool(getattr(spec.adapter, "blackbox", False))


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


class BlackBoxHost:
    """The server's side of black-box jobs: `logprobs` and the packets; no backward, no model needed.

    Offers the part of `colaflow.Host` a driver uses (`add_job`, `remove_job`, `apply`, `step`,
    `limits`, `jobs`), so the coordinator and the `Trainer` serve it as they serve a `Host`.
    """

    def __init__(self, logprobs: LogProbs, vocab_size: int, context: int | None = None,
                 jobs: dict | None = None):
        self.logprobs, self.vocab, self.context = logprobs, vocab_size, context
        self.jobs: dict = {} if jobs is None else jobs  # a `Host` shares its own: one namespace of jobs
        self.steps = 0

    def add_job(self, spec: JobSpec, init: dict | None = None) -> list[Site]:
        """Host a black-box job: its one site `<output>`; the server keeps no copy of the small model."""
        from .host import HostedJob

        if init is not None:
            raise ValueError("a black-box job cannot start from an export (`init`)")
        if not is_blackbox(spec):
            raise ValueError(f"job {spec.job_id!r}: a {spec.adapter.kind} adapter needs a torch model and a "
                             "backward (colaflow.Host); this host serves black-box kinds only")
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} is already hosted")
        site = output_site(self.vocab, spec.adapter.top_k)
        self.jobs[spec.job_id] = HostedJob(spec, {OUTPUT: site}, {}, {OUTPUT: 0})
        return [site]

    def remove_job(self, job_id: str) -> None:
        self.jobs.pop(job_id)

    def apply(self, update: Update) -> None:
        """Record the version the next step runs at (the forward itself never uses the small model)."""
        if update.job not in self.jobs or update.site != OUTPUT:
            raise ValueError(f"no black-box site `{update.site}` of job {update.job!r} is hosted")
        self.jobs[update.job].versions[OUTPUT] = update.version

    def limits(self) -> tuple[int | None, int | None]:
        return self.vocab, self.context

    def step(self, batch: dict, emit: Callable[[list[Packet]], None] | None = None,
             gate: Callable[[str], None] | None = None):
        """The large model's top-k log-probs of each job's rows, as one `<output>` packet per job."""
        from .host import StepResult

        jobs = list(batch["jobs"])
        order = list(dict.fromkeys(jobs))
        for j in order:
            if j not in self.jobs or not is_blackbox(self.jobs[j].spec):
                raise ValueError(f"job {j!r} is not a black-box job; black-box jobs step alone, "
                                 "never in one batch with ColA jobs")
        if gate is not None:  # the step's packets carry the version the scheduler planned
            gate(OUTPUT)
        ids, mask = batch["input_ids"], batch.get("attention_mask")  # (B, T)
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T): what position t predicts
        row_job = torch.tensor([order.index(j) for j in jobs])
        losses, tokens, packets = {}, {}, []
        for i, j in enumerate(order):
            rows = None if len(order) == 1 else (row_job == i).nonzero().squeeze(1)
            pick = (lambda t: t) if rows is None else (lambda t: t[rows.to(t.device)])
            top_k = self.jobs[j].spec.adapter.top_k
            k = top_k or self.vocab
            ids_j, mask_j, labels_j = pick(ids), None if mask is None else pick(mask), pick(labels)
            values, indices = self.logprobs(ids_j, mask_j, k)
            _check_logprobs(values, indices, ids_j.shape, k, self.vocab)
            x, g = encode(ids_j, labels_j.to(ids_j.device), values, indices, self.vocab, top_k)
            count = int((labels_j != IGNORE).sum())
            if count == 0:
                raise ValueError(f"job {j!r}: its rows in this batch carry no labelled token")
            losses[j] = float(-label_logprob(x, g, self.vocab).sum()) / count  # the large model's own loss
            tokens[j] = int(mask_j.sum()) if mask_j is not None else len(ids_j)
            packets.append(Packet(j, OUTPUT, self.steps, self.jobs[j].versions[OUTPUT], x.cpu(), g.cpu()))
        if emit is not None:
            emit(packets)
        result = StepResult(self.steps, losses, [] if emit is not None else packets, tokens)
        self.steps += 1
        return result


def _check_logprobs(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size, k: int, vocab: int) -> None:
    """Refuse what a `logprobs` callable returned unless it is (B, T, k) log-probs over the vocabulary."""
    want = (*shape, k)
    if tuple(values.shape) != want or tuple(indices.shape) != want:
        raise ValueError(f"`logprobs` returned values {tuple(values.shape)} and indices {tuple(indices.shape)}; "
                         f"expected {want} each")
    if not values.is_floating_point() or indices.is_floating_point():
        raise ValueError(f"`logprobs` must return float values and integer indices, got {values.dtype}, "
                         f"{indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"`logprobs` returned an index outside the vocabulary [0, {vocab})")
    if torch.isnan(values).any() or (values > 1e-4).any():
        raise ValueError("`logprobs` returned NaN or positive values; it must return log-probabilities")
