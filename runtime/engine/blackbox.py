"""Black-box output mode (Easy Adaptation): the server runs only a forward, the device learns on top.

A black-box job has one site, `<output>`, whose adapter is a small model on the device
(`colaflow.adapters.smalllm.SmallLM`). Its logits are added to the large model's log-probs; the
device trains it on the cross-entropy of that combination by ordinary backprop. The server runs the
base model's forward under `torch.no_grad()` (no backward at all), or just calls an API-style
`logprobs(input_ids, attention_mask, k) -> (values, indices)`: top-k log-probs, largest first.

    host = BlackBoxHost(logprobs, vocab_size=V)       # no torch model needed (an API, a remote LM)
    host.add_job(JobSpec("acme", SmallLM(top_k=8)))   # or Host(model).add_job(...): it routes here
    result = host.step(batch)                         # one Packet per job, site `<output>`

The packet layout is `colaflow.adapters.topk`'s.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..adapters.topk import OUTPUT, LogProbs, encode, label_logprob, model_logprobs, output_site
from ..data.batches import IGNORE
from ..job import JobSpec
from ..learn.messages import Packet
from ..sites import Site
from .hosted import HostedJob, StepResult

__all__ = ["OUTPUT", "BlackBoxHost", "is_blackbox", "model_logprobs"]


def is_blackbox(spec: JobSpec) -> bool:
    """Whether a job runs in black-box output mode (its adapter kind says so)."""
    return spec.adapter.blackbox


class BlackBoxHost:
    """The server's side of black-box jobs: `logprobs` and the packets; no backward, no model needed.

    Offers the part of `colaflow.Host` a driver uses (`add_job`, `remove_job`, `apply`, `step`,
    `limits`, `jobs`), so the coordinator and the `Trainer` serve it as they serve a `Host`.
    """

    def __init__(self, logprobs: LogProbs, vocab_size: int, context: int | None = None,
                 jobs: dict | None = None):
        self.logprobs, self.vocab, self.context = logprobs, vocab_size, context
        self.jobs: dict = {} if jobs is None else jobs  # a `Host` shares its own: one namespace of jobs

    def resolve(self, spec: JobSpec) -> None:
        """A black-box job's one site is made when it is hosted (`add_job`)."""
        return None

    def add_job(self, spec: JobSpec, init: dict | None = None, sites: list[Site] | None = None,
                shape: tuple[int, int] | None = None) -> list[Site]:
        """Host a black-box job: its one site `<output>`; the server keeps no copy of the small model."""
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

    def apply(self, load) -> None:
        """Record the version the next step runs at (the forward itself never uses the small model)."""
        if load.job not in self.jobs or load.site != OUTPUT:
            raise ValueError(f"no black-box site `{load.site}` of job {load.job!r} is hosted")
        self.jobs[load.job].versions[OUTPUT] = load.version

    def versions(self, job_id: str) -> dict[str, int]:
        return dict(self.jobs[job_id].versions)

    def limits(self) -> tuple[int | None, int | None]:
        return self.vocab, self.context

    def step(self, batch: dict, emit: Callable[[list[Packet]], None] | None = None,
             gate: Callable[[str], None] | None = None, steps: dict[str, int] | None = None) -> StepResult:
        """The large model's top-k log-probs of each job's rows, as one `<output>` packet per job
        (stamped with the job's step number in `steps`, 0 where not given)."""
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
            pick = (lambda t: t) if rows is None else (lambda t, rows=rows: t[rows.to(t.device)])
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
            step = (steps or {}).get(j, 0)
            packets.append(Packet(j, OUTPUT, step, self.jobs[j].versions[OUTPUT], x.cpu(), g.cpu()))
        if emit is not None:
            emit(packets)
        return StepResult(losses, [] if emit is not None else packets, tokens)


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
