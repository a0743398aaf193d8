"""The capture step: a frozen base model, the server's copy of every job's adapters, and the step.

One `step` runs forward with each row's job's adapters and a backward that computes no parameter
gradient at all, only g = dL/dh at every adapted site, and returns one packet per (job, site):

    host = Host(model)
    host.add_job(JobSpec("acme"))
    result = host.step(batch, steps={"acme": t})   # batch: model inputs + labels + jobs (a job id per row)
    for p in result.packets: ...                    # Packet(job, site, t, version, x, g) -> the owning worker
    host.apply(load)                                # at a step boundary: the version the scheduler chose

It lives in the library (not the service) because the in-process `Trainer` runs it too; the
server's coordinator runs the same object on its device. The site hooks are `hooks.py`'s, the
packets leave through `packets.py`, a mixed batch splits per `mixed.py` and `layout.py`.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters.base import build_adapter, load_params, param_shapes
from ..adapters.merge import merged_weights
from ..adapters.topk import model_logprobs
from ..data.batches import IGNORE
from ..job import JobSpec
from ..learn.fit import site_seed
from ..learn.messages import Packet
from ..sites import Site, find_sites, site_module
from . import weights
from .blackbox import BlackBoxHost, is_blackbox
from .checkpointing import Checkpointing
from .hooks import SiteHooks
from .hosted import HostedJob, StepContext, StepResult
from .layout import RowLayout
from .lmhead import fused, head_of
from .loss import LossFn, causal_lm, per_job, token_cls
from .memory import Budget
from .mixed import micro_batches, sub_batch
from .packets import PacketStream

if TYPE_CHECKING:
    from ..control.records import Load

__all__ = ["MIX_ROWS", "Host", "HostedJob", "StepResult"]


MIX_ROWS = 6  # rows per micro-batch of a mixed step: on CPU, batching gains little past ~6 rows of 128 tokens


class Host(SiteHooks):
    """The server's side of ColA: frozen model + per-job adapter copies + the capture step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = causal_lm, mix_rows: int = MIX_ROWS,
                 checkpointing: bool | str = False, max_memory: int | None = None):
        """`checkpointing`: recompute each block's activations in the backward instead of keeping them
        (less memory, about a third more compute; the packets are the same): True, False, or "auto" —
        for the jobs whose steps would not fit `max_memory` otherwise. `max_memory`: the bytes this
        server may use (None: the device's); a job whose step and packets cannot fit is refused."""
        if checkpointing not in (True, False, "auto"):
            raise ValueError(f"`checkpointing` must be True, False or 'auto', got {checkpointing!r}")
        if not isinstance(mix_rows, int) or mix_rows < 1:
            raise ValueError(f"`mix_rows` must be a positive int, got {mix_rows!r}")
        self.model = model
        self._model_size: int | None = None  # parameters (at least 2**20): what one job's adapters may hold
        self.loss_fn = loss_fn
        self.mix_rows = mix_rows  # a mixed batch runs as micro-batches of whole jobs, this many rows each
        for p in model.parameters():
            p.requires_grad_(False)
        weights.prepare(model)  # a 4-bit base keeps its differentiable kernel
        self.checkpointing = Checkpointing(model, self._recompute) if checkpointing is True else None
        self.memory = Budget(model, checkpointing, max_memory)
        self._takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.jobs: dict[str, HostedJob] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._ctx: StepContext | None = None
        self._packing: ThreadPoolExecutor | None = None
        self._blackbox: BlackBoxHost | None = None  # serves black-box jobs (forward only), made on first use
        # the head the loss fuses with (colaflow.engine.lmhead); False: not looked at yet
        self._head: nn.Module | None | bool = False
        self.layout = RowLayout()  # which sites a mixed batch may split by job

    # jobs and updates

    def resolve(self, spec: JobSpec) -> list[Site] | None:
        """The job's sites as its adapters see them, checked; None for a black-box job. A server calls
        it before taking its lock: a target regex is matched against every module name."""
        if is_blackbox(spec):
            return None
        targets = spec.target_modules if spec.target_modules is not None else spec.adapter.default_targets(self.model)
        # the sites as the adapters see them: a sequential adapter's site reads the module's output
        sites = [spec.adapter.view(s) for s in find_sites(self.model, targets)]
        odd = [s for s in sites if spec.packets == "projected" and s.kind not in ("linear", "conv1d")]
        if odd:  # the statistics are of token rows: an embedding's or a convolution's input is not one
            raise ValueError(f"job {spec.job_id!r}: `packets='projected'` serves linear and conv1d sites; "
                             f"`{odd[0].name}` is a {odd[0].kind} site: leave it out of `targets`, or use "
                             "packets='full'")
        # (meta: no memory)
        size = sum(math.prod(shape) for s in sites for shape in param_shapes(spec.adapter, s).values())
        if self._model_size is None:
            self._model_size = max(sum(p.numel() for p in self.model.parameters()), 1 << 20)
        if size > self._model_size:  # memory a tenant could take: no adapter needs more than the model it adapts
            raise ValueError(f"job {spec.job_id!r}: its adapters would hold {size:,} parameters, more than the frozen "
                             f"model's {self._model_size:,}: choose a smaller size (`r`, `hidden`) or fewer targets")
        return sites

    def add_job(self, spec: JobSpec, init: dict[str, dict] | None = None, sites: list[Site] | None = None,
                shape: tuple[int, int] | None = None) -> list[Site]:
        """Host a job: resolve its sites (unless given: `resolve`'s), build its adapter copies (from `init`
        {site: params} if given; the scheduler checks it), hook its sites. `shape`: its batches' (rows,
        tokens) at most; a job whose step cannot fit the server's memory is refused (`ResourceExhausted`)."""
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} is already hosted")
        if is_blackbox(spec):  # black-box output mode: one `<output>` site, forward only (colaflow.engine.blackbox)
            if self._blackbox is None:
                self._blackbox = BlackBoxHost(model_logprobs(self.model), *self.limits(), jobs=self.jobs)
            return self._blackbox.add_job(spec, init)
        sites = self.resolve(spec) if sites is None else sites
        fit = self.memory.admit(spec, sites, shape, {j: h.fit for j, h in self.jobs.items()},  # before any allocation
                                vocab=self._whole_logits(sites) if shape is not None else 0)
        if fit is not None and fit.checkpointed and self.checkpointing is None:
            self.checkpointing = Checkpointing(self.model, self._recompute)  # "auto": this job needs it
        adapters = {}
        for s in sites:
            a = build_adapter(spec.adapter, s, seed=site_seed(spec, s))
            if init is not None and s.name in init:
                load_params(a, init[s.name])
            adapters[s.name] = a.to(self._device_of(s)).requires_grad_(False)
        self.jobs[spec.job_id] = HostedJob(spec, {s.name: s for s in sites}, adapters, {s.name: 0 for s in sites},
                                           fit=fit)
        for s in sites:
            if s.name not in self._hooks:
                mod = site_module(self.model, s)
                self._hooks[s.name] = mod.register_forward_hook(self._site_hook(s.name))
        return sites

    def held(self) -> dict:
        """What this server holds — dtype, quantization, devices, weight bytes — and the memory its
        jobs are promised: `engine.memory.Budget.view`."""
        return self.memory.view([h.fit for h in list(self.jobs.values())])

    def limits(self) -> tuple[int | None, int | None]:
        """(vocabulary size, context length) of the model where it says, else None: what data must fit."""
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        try:
            vocab = self.model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError):
            pass
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return vocab, context

    def remove_job(self, job_id: str) -> None:
        self.jobs.pop(job_id)
        live = {n for j in self.jobs.values() for n in j.sites}
        for name in [n for n in self._hooks if n not in live]:
            self._hooks.pop(name).remove()

    def apply(self, load: Load) -> None:
        """Use a version's parameters from the next forward (`Load`: job, site, version, params); the
        scheduler picks which version a step needs."""
        job = self._job(load.job)
        if is_blackbox(job.spec):
            return self._blackbox.apply(load)
        if load.site not in job.adapters:
            raise ValueError(f"job {load.job!r} has no site `{load.site}`")
        if load.version == job.versions[load.site]:
            return
        load_params(job.adapters[load.site], load.params)
        job.versions[load.site] = load.version
        job.merged.pop(load.site, None)

    def versions(self, job_id: str) -> dict[str, int]:
        """The version each of the job's copies holds now (the scheduler plans a step's loads from it)."""
        return dict(self._job(job_id).versions)

    def _job(self, job_id: str) -> HostedJob:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}; hosted: {sorted(self.jobs)}")
        return self.jobs[job_id]

    def packer(self) -> ThreadPoolExecutor:
        """One thread that turns copied-out device tensors into packets, in order (CUDA steps only)."""
        if self._packing is None:
            self._packing = ThreadPoolExecutor(1, thread_name_prefix="colaflow-pack")
        return self._packing

    def _device_of(self, site: Site) -> torch.device:
        return weights.execution_device(site_module(self.model, site), self.model)

    # the step

    def step(self, batch: dict, emit: Callable[[list[Packet]], None] | None = None,
             gate: Callable[[str], None] | None = None, steps: dict[str, int] | None = None) -> StepResult:
        """Forward with adapters, backward for site gradients only; one packet per (job, site), stamped
        with the job's step number in `steps` (the scheduler's plan; 0 where not given).

        Packets stream out of the backward: a site's packet is made as soon as the gradients of
        every site sharing its input exist (top layers first), and its g is released then. With
        `emit`, each such group goes to `emit` at that moment (the wire overlaps the backward) and
        `result.packets` stays empty; without, they are collected in `result.packets`. `gate(site)`
        runs just before a site's adapter does: it may block until that site's version is loaded
        (a step that starts while the devices still fit its lower layers).
        """
        jobs, steps = list(batch["jobs"]), steps or {}
        if self._blackbox is not None and any(is_blackbox(self._job(j).spec) for j in set(jobs)):
            return self._blackbox.step(batch, emit, gate, steps)  # alone (it refuses a batch with ColA jobs)
        parts = micro_batches(jobs, self.mix_rows)
        if parts is None:
            return self._step(batch, emit, gate, steps)
        for j in dict.fromkeys(jobs):  # several jobs: micro-batches of whole jobs (mixed.py)
            self._job(j)
        result = StepResult({}, [], {})
        for rows in parts:
            r = self._step(sub_batch(batch, rows), emit, gate, steps)
            result.losses |= r.losses
            result.tokens |= r.tokens
            result.packets += r.packets
        return result

    def _step(self, batch: dict, emit, gate, steps: dict[str, int]) -> StepResult:
        jobs = list(batch["jobs"])
        device = weights.input_device(self.model)
        if self.loss_fn in (causal_lm, token_cls):
            self._check_labels(batch)  # (before the copy to the device: no host sync for it)
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k not in ("jobs", "labels")}
        if self._takes_use_cache:  # a training step reads no KV cache: building one costs memory for nothing
            inputs["use_cache"] = False
        ctx = self._context(jobs, capture=True, device=device)
        ctx.gate, ctx.mask, ctx.steps = gate, batch.get("attention_mask"), steps
        ctx.checkpointing = self._checkpoint_now(ctx.order)
        if ctx.checkpointing:
            # a merged W + dW exists only inside the forward's functional_call: a block's replay would run
            # the base W (other activations, wrong g); the unmerged delta is the same function
            ctx.merged = set()
            # a site outside every block (lm_head, a classifier's score) runs once: it keeps x in the forward
            ctx.recomputed = {n for n in self._hooks if self.checkpointing.covers(site_module(self.model, n))}
        ctx.grid = next((tuple(v.shape[:2]) for k in ("input_ids", "attention_mask", "labels")
                         if isinstance(v := batch.get(k), torch.Tensor) and v.dim() >= 2), None)
        if len(ctx.order) > 1:
            self.layout.probe(self.model, list(self._hooks), inputs, len(jobs))
        collected: list[Packet] = []
        head = self._fused_head()  # (looked up once per model, before the step's hooks are live)
        self._ctx = ctx
        try:
            rows = {j: torch.arange(len(jobs), device=device) if r is None else r for j, r in ctx.rows.items()}
            with torch.enable_grad():
                if head is not None:  # the loss's gradient is made with the logits, a chunk at a time
                    with fused(head, batch["labels"], rows) as f:
                        output = self._forward(inputs, ctx)
                    if f.losses is None:
                        raise RuntimeError("the model's forward did not call its output embedding")
                    losses = f.losses
                else:
                    output = self._forward(inputs, ctx)
                    losses = per_job(*self.loss_fn(output, batch), rows)
                del output  # the backward does not need the logits: keeping them costs a (B, T, V) tensor
                for job_id in ctx.rows:
                    missed = [n for n in self.jobs[job_id].sites if n not in ctx.shapes]
                    if missed:  # e.g. a tied embedding whose module is not the one the forward calls
                        raise RuntimeError(f"site `{missed[0]}` of job {job_id!r} was not called in the forward "
                                           f"({len(missed)} of its sites were not); pick modules the forward runs")
                stream = PacketStream(self.jobs, ctx, losses, emit or collected.extend, self.packer)
                ctx.stream = stream
                if not ctx.captured.leaves:  # only when something upstream of every site already wants a gradient
                    raise RuntimeError("no adapted site starts a gradient path: the model's inputs or parameters "
                                       "require grad; the host expects a frozen model and integer inputs")
                try:
                    torch.autograd.grad(sum(losses.values()), ctx.captured.leaves, allow_unused=True)
                except BaseException:
                    stream.abort()
                    raise
                stream.finish()  # sites no loss depends on: zero gradients
        finally:
            self._ctx = None
            if self.checkpointing is not None:
                self.checkpointing.active = False  # its blocks replay only within this host's steps
            # each site's grad hook holds ctx, and autograd holds the hooks where Python's collector cannot
            # see: ctx must let go of the step's tensors, or every step's x, g and graph stay (a leak)
            ctx.captured = None
            ctx.stream = ctx.gate = ctx.mask = None
        mask, per_row = batch.get("attention_mask"), ctx.grid[1] if ctx.grid else 1
        tokens = {}
        for job_id, rows in ctx.rows.items():
            m = None if mask is None else (mask if rows is None else mask[rows])
            tokens[job_id] = int(m.sum()) if m is not None else (len(jobs) if rows is None else len(rows)) * per_row
        return StepResult({j: float(v.detach()) for j, v in losses.items()}, collected, tokens)

    def _check_labels(self, batch: dict) -> None:
        """Token ids outside the head's outputs, named with their job (a GPU would index out of range)."""
        labels, vocab = batch.get("labels"), self._outputs()
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or vocab is None:
            return
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            row = int(bad.any(-1).nonzero()[0]) if bad.dim() > 1 else int(bad.nonzero()[0])
            value = int(labels[row][bad[row]].flatten()[0]) if bad.dim() > 1 else int(labels[row])
            raise ValueError(f"job {batch['jobs'][row]!r}: label {value} is outside the vocabulary "
                             f"(0..{vocab - 1}, or {IGNORE} for no loss)")

    def _outputs(self) -> int | None:
        """How many tokens the output embedding scores (the input embedding's count where unsaid)."""
        try:
            head = self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
        n = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
        return n if isinstance(n, int) else self.limits()[0]

    def _fused_head(self) -> nn.Module | None:
        """The output embedding the causal-LM loss fuses with, unless it is itself adapted."""
        if self.loss_fn is not causal_lm:
            return None
        if self._head is False:
            self._head = head_of(self.model)
        head = self._head
        if head is None or any(site_module(self.model, n) is head for n in self._hooks):
            return None
        return head

    def _whole_logits(self, sites: list[Site]) -> int:
        """The logits per token a step with these sites makes whole (a token loss not fused with the head:
        none to fuse, or an adapted head), 0 where they come a chunk at a time: what admission counts."""
        if self.loss_fn not in (causal_lm, token_cls):
            return 0
        if self.loss_fn is causal_lm:
            head = self._head
            if head is False:  # not probed yet: the step probes it (a forward here could run beside a step)
                try:
                    head = self.model.get_output_embeddings()
                except (AttributeError, NotImplementedError):
                    head = None
                head = head if type(head) is nn.Linear else None
            adapted = [site_module(self.model, s) for s in sites] + [site_module(self.model, n) for n in self._hooks]
            if head is not None and not any(m is head for m in adapted):
                return 0
        return self._outputs() or 0

    def _checkpoint_now(self, jobs: list[str]) -> bool:
        """Whether this step recomputes its blocks: always when asked to, else where one of its jobs was
        admitted only with checkpointing."""
        on = self.memory.mode is True or any(getattr(self.jobs[j].fit, "checkpointed", False) for j in jobs)
        if self.checkpointing is not None:
            self.checkpointing.active = on
        return on and self.checkpointing is not None

    @contextlib.contextmanager
    def _recompute(self):
        """A checkpointed block runs again in the backward: its site hooks know (they keep x now)."""
        ctx = self._ctx
        if ctx is None:
            yield
            return
        ctx.recomputing = True
        try:
            yield
        finally:
            ctx.recomputing = False

    @contextlib.contextmanager
    def using(self, job_id: str):
        """Run the model as `job_id`'s adapted model (inference, e.g. `generate`)."""
        self._job(job_id)
        ctx = self._context([job_id], capture=False)
        ctx.merged = set()
        self._ctx = ctx

        def mask(module, args, kwargs):  # conditional kinds choose among real tokens (hooks.py)
            ctx.mask = kwargs.get("attention_mask")
        hook = self.model.register_forward_pre_hook(mask, with_kwargs=True)
        try:
            yield self.model
        finally:
            hook.remove()
            self._ctx = None

    def _context(self, jobs: list[str], capture: bool, device: torch.device | None = None) -> StepContext:
        order = list(dict.fromkeys(jobs))
        for j in order:
            self._job(j)
        if len(order) == 1:
            job = self.jobs[order[0]]
            merged = {n for n, a in job.adapters.items() if job.spec.merge and self._mergeable(job, n)}
            return StepContext({order[0]: None}, order, merged, capture)
        row_job = torch.tensor([order.index(j) for j in jobs])
        # on the model's device: an index on the host would make every `t[rows]` in the backward a sync
        rows = {j: (row_job == i).nonzero().squeeze(1).to(device or "cpu") for i, j in enumerate(order)}
        runs, start = [], 0
        for i in range(1, len(jobs) + 1):
            if i == len(jobs) or jobs[i] != jobs[start]:
                runs.append((start, i, jobs[start]))
                start = i
        return StepContext(rows, order, set(), capture, runs=runs)

    def _mergeable(self, job: HostedJob, name: str) -> bool:
        adapter, mod = job.adapters[name], site_module(self.model, name)
        if not adapter.spec.mergeable or not weights.mergeable_weight(mod):  # a 4-bit or offloaded weight: unmerged
            return False
        return not (getattr(adapter, "bias", None) is not None and getattr(mod, "bias", None) is None)

    def _forward(self, inputs: dict, ctx: StepContext):
        if not ctx.merged:
            return self.model(**inputs)
        job = self.jobs[ctx.order[0]]
        overrides = {}
        for name in ctx.merged:
            version, w, b = self._merged_weight(job, name)
            overrides[f"{name}.weight"] = w
            if b is not None:
                overrides[f"{name}.bias"] = b
        # W + dW is computed out of place: the base weights are never written, so never drift.
        # tie_weights=False: a merged embedding must not also change a tied lm_head.
        return torch.func.functional_call(self.model, overrides, (), inputs, tie_weights=False, strict=False)

    def _merged_weight(self, job: HostedJob, name: str):
        cached = job.merged.get(name)
        if cached is None or cached[0] != job.versions[name]:
            w = merged_weights(self.model, {name: job.adapters[name]})
            job.merged[name] = cached = (job.versions[name], w[f"{name}.weight"], w.get(f"{name}.bias"))
        return cached
