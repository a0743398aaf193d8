"""The capture step: a frozen base model, the server's copy of every job's adapters, and the step.

One `step` runs forward with each row's job's adapters and a backward that computes no parameter
gradient at all, only g = dL/dh at every adapted site, and returns one packet per (job, site):

    host = Host(model)
    host.add_job(JobSpec("acme"))
    result = host.step(batch)          # batch: model inputs + labels + jobs (one job id per row)
    for p in result.packets: ...       # Packet(job, site, step, version, x, g) -> the owning worker
    host.apply(update)                 # at a step boundary: the version the scheduler chose

It lives in the library (not the service) because the in-process `Trainer` runs it too; the
server's coordinator runs the same object on its device.
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, build_adapter, load_params
from .blackbox import BlackBoxHost, is_blackbox, model_logprobs
from .gl import Packet, Update, site_seed
from .job import JobSpec
from .lmhead import fused, head_of
from .loss import IGNORE, LossFn, causal_lm, per_job, token_cls
from .merge import merged_weights
from .mixed import micro_batches, stackable, stacked_delta, sub_batch
from .records import param_shapes
from .sites import Site, find_sites, site_module
from .stream import PacketStream


MIX_ROWS = 6  # rows per micro-batch of a mixed step: on CPU, batching gains little past ~6 rows of 128 tokens


@dataclass
class HostedJob:
    spec: JobSpec
    sites: dict[str, Site]
    adapters: dict[str, Adapter]  # the server's copies: parameters only, never a gradient
    versions: dict[str, int]
    merged: dict[str, tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@dataclass
class StepResult:
    step: int
    losses: dict[str, float]  # each job's mean loss over its own tokens
    packets: list[Packet]
    tokens: dict[str, int]


@dataclass
class _Ctx:
    """What the site hooks need during one forward; lives only inside `step` / `using`."""

    rows: dict[str, torch.Tensor | None]  # job -> row indices (None: the job has every row)
    order: list[str]
    merged: set[str]  # sites whose weights already carry the single job's delta
    capture: bool
    runs: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, job): rows of one job
    leaves: list[torch.Tensor] = field(default_factory=list)  # where the backward starts from
    shapes: dict[str, tuple] = field(default_factory=dict)  # sites the forward ran: (shape, dtype, device) of each output
    stream: PacketStream | None = None
    gate: Callable[[str], None] | None = None
    inputs: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> x
    routes: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> (B, T) token types
    selected: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (job, site) -> (B, T) bool
    mask: torch.Tensor | None = None  # the batch's attention mask (conditional kinds choose among real tokens)
    grid: tuple[int, int] | None = None  # the batch's (rows, tokens)
    detached: dict[tuple, torch.Tensor] = field(default_factory=dict)


class Host:
    """The server's side of ColA: frozen model + per-job adapter copies + the capture step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = causal_lm, mix_rows: int = MIX_ROWS):
        if not isinstance(mix_rows, int) or mix_rows < 1:
            raise ValueError(f"`mix_rows` must be a positive int, got {mix_rows!r}")
        self.model = model
        self._model_size: int | None = None  # parameters (at least 2**20): what one job's adapters may hold
        self.loss_fn = loss_fn
        self.mix_rows = mix_rows  # a mixed batch runs as micro-batches of whole jobs, this many rows each
        for p in model.parameters():
            p.requires_grad_(False)
        self.jobs: dict[str, HostedJob] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._ctx: _Ctx | None = None
        self._packing: ThreadPoolExecutor | None = None
        self._blackbox: BlackBoxHost | None = None  # serves black-box jobs (forward only), made on first use
        self._head: nn.Module | None | bool = False  # the head the loss fuses with (colaflow.lmhead); False: not looked at yet
        # site -> the row counts its input has shown along its first dimension; None: it showed
        # something else (sequence-first, tokens flattened or routed): never split by job
        self._layout: dict[str, set[int] | None] = {}
        self._probed: set[str] = set()  # sites a one-row forward has looked at (`_probe_layouts`)
        self.steps = 0

    # jobs and updates

    def resolve(self, spec: JobSpec) -> list[Site] | None:
        """The job's sites as its adapters see them, checked; None for a black-box job. A server calls
        it before taking its lock: a target regex is matched against every module name."""
        if is_blackbox(spec):
            return None
        targets = spec.target_modules if spec.target_modules is not None else spec.adapter.default_targets(self.model)
        # the sites as the adapters see them: a sequential adapter's site reads the module's output
        sites = [spec.adapter.view(s) for s in find_sites(self.model, targets)]
        size = sum(math.prod(shape) for s in sites for shape in param_shapes(spec, s).values())  # (meta: no memory)
        if self._model_size is None:
            self._model_size = max(sum(p.numel() for p in self.model.parameters()), 1 << 20)
        if size > self._model_size:  # memory a tenant could take: no adapter needs more than the model it adapts
            raise ValueError(f"job {spec.job_id!r}: its adapters would hold {size:,} parameters, more than the frozen "
                             f"model's {self._model_size:,}: choose a smaller size (`r`, `hidden`) or fewer targets")
        return sites

    def add_job(self, spec: JobSpec, init: dict[str, dict] | None = None, sites: list[Site] | None = None) -> list[Site]:
        """Host a job: resolve its sites (unless given: `resolve`'s), build its adapter copies (from `init`
        {site: params} if given; the scheduler checks it), hook its sites."""
        if spec.job_id in self.jobs:
            raise ValueError(f"job {spec.job_id!r} is already hosted")
        if is_blackbox(spec):  # black-box output mode: one `<output>` site, forward only (colaflow.blackbox)
            if self._blackbox is None:
                self._blackbox = BlackBoxHost(model_logprobs(self.model), *self.limits(), jobs=self.jobs)
            return self._blackbox.add_job(spec, init)
        sites = self.resolve(spec) if sites is None else sites
        adapters = {}
        for s in sites:
            a = build_adapter(spec.adapter, s, seed=site_seed(spec, s))
            if init is not None and s.name in init:
                load_params(a, init[s.name])
            adapters[s.name] = a.to(self._device_of(s)).requires_grad_(False)
        self.jobs[spec.job_id] = HostedJob(spec, {s.name: s for s in sites}, adapters, {s.name: 0 for s in sites})
        for s in sites:
            if s.name not in self._hooks:
                mod = site_module(self.model, s)
                self._hooks[s.name] = mod.register_forward_hook(self._site_hook(s.name))
        return sites

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

    def apply(self, update: Update) -> None:
        """Use an update's parameters (and version) from the next forward; the scheduler picks which."""
        job = self._job(update.job)
        if is_blackbox(job.spec):
            return self._blackbox.apply(update)
        if update.site not in job.adapters:
            raise ValueError(f"job {update.job!r} has no site `{update.site}`")
        if update.version == job.versions[update.site]:
            return
        load_params(job.adapters[update.site], update.params)
        job.versions[update.site] = update.version
        job.merged.pop(update.site, None)

    def _job(self, job_id: str) -> HostedJob:
        if job_id not in self.jobs:
            raise KeyError(f"unknown job {job_id!r}; hosted: {sorted(self.jobs)}")
        return self.jobs[job_id]

    def _packer(self) -> ThreadPoolExecutor:
        """One thread that turns copied-out device tensors into packets, in order (CUDA steps only)."""
        if self._packing is None:
            self._packing = ThreadPoolExecutor(1, thread_name_prefix="colaflow-pack")
        return self._packing

    def _device_of(self, site: Site) -> torch.device:
        return next(site_module(self.model, site).parameters()).device

    # the step

    def step(self, batch: dict, emit: Callable[[list[Packet]], None] | None = None,
             gate: Callable[[str], None] | None = None) -> StepResult:
        """Forward with adapters, backward for site gradients only; one packet per (job, site).

        Packets stream out of the backward: a site's packet is made as soon as the gradients of
        every site sharing its input exist (top layers first), and its g is released then. With
        `emit`, each such group goes to `emit` at that moment (the wire overlaps the backward) and
        `result.packets` stays empty; without, they are collected in `result.packets`. `gate(site)`
        runs just before a site's adapter does: it may block until that site's version is loaded
        (a step that starts while the devices still fit its lower layers).
        """
        jobs = list(batch["jobs"])
        if self._blackbox is not None and any(is_blackbox(self._job(j).spec) for j in set(jobs)):
            self._blackbox.steps = self.steps  # black-box jobs step alone (it refuses a batch with ColA jobs)
            result = self._blackbox.step(batch, emit, gate)
            self.steps += 1
            return result
        parts = micro_batches(jobs, self.mix_rows)
        if parts is None:
            result = self._step(batch, emit, gate)
        else:  # several jobs: micro-batches of whole jobs (colaflow.mixed), one step number
            for j in dict.fromkeys(jobs):
                self._job(j)
            result = StepResult(self.steps, {}, [], {})
            for rows in parts:
                r = self._step(sub_batch(batch, rows), emit, gate)
                result.losses |= r.losses
                result.tokens |= r.tokens
                result.packets += r.packets
        self.steps += 1
        return result

    def _step(self, batch: dict, emit, gate) -> StepResult:
        jobs = list(batch["jobs"])
        device = next(self.model.parameters()).device
        if self.loss_fn in (causal_lm, token_cls):
            self._check_labels(batch)  # (before the copy to the device: no host sync for it)
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k not in ("jobs", "labels")}
        ctx = self._context(jobs, capture=True, device=device)
        ctx.gate, ctx.mask = gate, batch.get("attention_mask")
        ctx.grid = next((tuple(v.shape[:2]) for k in ("input_ids", "attention_mask", "labels")
                         if isinstance(v := batch.get(k), torch.Tensor) and v.dim() >= 2), None)
        if len(ctx.order) > 1:
            self._probe_layouts(inputs, len(jobs))
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
                stream = PacketStream(self, ctx, losses, emit or collected.extend)
                ctx.stream, ctx.detached = stream, {}  # x now lives in ctx.inputs only, until it is sent
                if not ctx.leaves:  # only when something upstream of every site already wants a gradient
                    raise RuntimeError("no adapted site starts a gradient path: the model's inputs or parameters "
                                       "require grad; the host expects a frozen model and integer inputs")
                try:
                    torch.autograd.grad(sum(losses.values()), ctx.leaves, allow_unused=True)
                except BaseException:
                    stream.abort()
                    raise
                stream.finish()  # sites no loss depends on: zero gradients
        finally:
            self._ctx = None
            # each site's grad hook holds ctx, and autograd holds the hooks where Python's collector cannot
            # see: ctx must let go of the step's tensors, or every step's x, g and graph stay (a leak)
            ctx.leaves, ctx.inputs, ctx.routes, ctx.selected, ctx.detached = [], {}, {}, {}, {}
            ctx.stream = ctx.gate = ctx.mask = None
        mask, per_row = batch.get("attention_mask"), ctx.grid[1] if ctx.grid else 1
        tokens = {}
        for job_id, rows in ctx.rows.items():
            m = None if mask is None else (mask if rows is None else mask[rows])
            tokens[job_id] = int(m.sum()) if m is not None else (len(jobs) if rows is None else len(rows)) * per_row
        return StepResult(self.steps, {j: float(v.detach()) for j, v in losses.items()}, collected, tokens)

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

    @contextlib.contextmanager
    def using(self, job_id: str):
        """Run the model as `job_id`'s adapted model (inference, e.g. `generate`)."""
        self._job(job_id)
        ctx = self._context([job_id], capture=False)
        ctx.merged = set()
        self._ctx = ctx

        def mask(module, args, kwargs):  # conditional kinds choose among real tokens (see `_adapter_input`)
            ctx.mask = kwargs.get("attention_mask")
        hook = self.model.register_forward_pre_hook(mask, with_kwargs=True)
        try:
            yield self.model
        finally:
            hook.remove()
            self._ctx = None

    def _context(self, jobs: list[str], capture: bool, device: torch.device | None = None) -> _Ctx:
        order = list(dict.fromkeys(jobs))
        for j in order:
            self._job(j)
        if len(order) == 1:
            job = self.jobs[order[0]]
            merged = {n for n, a in job.adapters.items() if job.spec.merge and self._mergeable(job, n)}
            return _Ctx({order[0]: None}, order, merged, capture)
        row_job = torch.tensor([order.index(j) for j in jobs])
        # on the model's device: an index on the host would make every `t[rows]` in the backward a sync
        rows = {j: (row_job == i).nonzero().squeeze(1).to(device or "cpu") for i, j in enumerate(order)}
        runs, start = [], 0
        for i in range(1, len(jobs) + 1):
            if i == len(jobs) or jobs[i] != jobs[start]:
                runs.append((start, i, jobs[start]))
                start = i
        return _Ctx(rows, order, set(), capture, runs=runs)

    def _mergeable(self, job: HostedJob, name: str) -> bool:
        adapter, mod = job.adapters[name], site_module(self.model, name)
        if not adapter.spec.mergeable:
            return False
        return not (getattr(adapter, "bias", None) is not None and getattr(mod, "bias", None) is None)

    def _forward(self, inputs: dict, ctx: _Ctx):
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

    # the site hook: add each row's job's delta, keep x and the output whose gradient we want

    def _site_hook(self, name: str):
        def hook(module, args, output):
            ctx = self._ctx
            if ctx is None:
                return None
            jobs = [j for j in ctx.order if name in self.jobs[j].adapters]
            if not jobs:
                return None
            if ctx.capture and name in ctx.shapes:
                raise RuntimeError(f"site `{name}` was called twice in one forward; colaflow adapts "
                                   "modules that run once per forward")
            x = args[0]
            if ctx.gate is not None:
                ctx.gate(name)
            if ctx.capture and not output.requires_grad:
                output = output.detach().requires_grad_(True)  # nothing below needs a gradient
                ctx.leaves.append(output)
            delta = self._delta(name, x, output, jobs, ctx)
            # fp32 adapters on a bf16 model: the sum in fp32, then the model's dtype (as PEFT's LoRA layer)
            out = output if delta is None else (output + delta).to(output.dtype)
            ctx.shapes[name] = (out.shape, out.dtype, out.device)
            if ctx.capture:  # g leaves the backward here, not at its end
                out.register_hook(lambda g: ctx.stream.grad(name, g))
            return out
        return hook

    def _delta(self, name: str, x: torch.Tensor, output: torch.Tensor, jobs: list[str], ctx: _Ctx):
        if len(jobs) == 1 and ctx.rows[jobs[0]] is None:  # single-job batch
            job = self.jobs[jobs[0]]
            xj, route, sel = self._adapter_input(job, name, x, output, ctx)
            if ctx.grid is not None:
                self._observe(name, xj, ctx.grid[0])
            return None if name in ctx.merged else _call(job.adapters[name], xj, route, sel)
        # a mixed batch: each run of one job's rows through that job's adapter, one call per run
        # (no per-row copies of A and B), and zeros for rows whose job does not adapt this site
        xs = {j: self._adapter_input(self.jobs[j], name, x, output, ctx) for j in jobs}
        sizes = [end - start for start, end, _ in ctx.runs]
        first = next(iter(xs.values()))[0]
        self._observe(name, first, sum(sizes))
        if not self._one_row_per_row(name, first, sum(sizes)):  # e.g. an MoE expert reading (B*T, H)
            raise ValueError(f"site `{name}` reads an input of shape {tuple(first.shape)}, not one row per batch "
                             f"row ({sum(sizes)}): a mixed batch cannot tell its jobs' rows apart; step its jobs alone")
        if all(j in xs and xs[j][0] is first and xs[j][1] is None and xs[j][2] is None for *_, j in ctx.runs):
            adapters = [self.jobs[j].adapters[name] for *_, j in ctx.runs]
            if stackable(adapters, first, sizes):  # LoRA of one shape: two batched matmuls for all runs
                return stacked_delta(adapters, first)
        # one split, not a slice per run: a slice's backward fills a whole-batch gradient with zeros
        pieces = first.split(sizes) if all(v[0] is first for v in xs.values()) else [
            xs[j][0][start:end] if j in xs else None for start, end, j in ctx.runs]
        parts = []
        for (start, end, j), piece in zip(ctx.runs, pieces):
            if j in xs:
                route, sel = (None if t is None else t[start:end] for t in xs[j][1:])
                parts.append(_call(self.jobs[j].adapters[name], piece, route, sel))
            else:
                parts.append(output.new_zeros((end - start, *output.shape[1:])))
        return torch.cat(parts)

    def _one_row_per_row(self, name: str, x: torch.Tensor, rows: int) -> bool:
        """Whether the site's input runs along the batch's rows first, so rows can be told apart.

        Its shape alone cannot always say: a sequence-first (T, B, H) input looks batch-first when
        T == B, and an MoE expert's (tokens routed to it, H) when as many tokens as rows were. So a
        site is split only on evidence (`_observe`): a 3-D input once seen with the rows first and
        not also second, a 2-D one at two row counts (the probe's one row and a step's), and never
        after it showed anything else."""
        seen = self._layout.get(name)
        if x.dim() == 0 or x.shape[0] != rows or not seen:
            return False
        return len(seen) >= 2 if x.dim() == 2 else True

    def _observe(self, name: str, x: torch.Tensor, rows: int) -> None:
        seen = self._layout.setdefault(name, set())
        if seen is None or x.dim() == 0:
            return
        if x.shape[0] != rows:
            self._layout[name] = None
        elif x.dim() == 2 or x.shape[1] != rows:  # (B, B, ...) says nothing
            seen.add(rows)

    def _probe_layouts(self, inputs: dict, rows: int) -> None:
        """Before a mixed batch first splits sites whose layout is unknown: one row of it, once,
        shows which way round each site's input comes ((1, T, ...) or (T, 1, ...))."""
        unknown = [n for n in self._hooks if n not in self._probed]
        if not unknown or rows < 2:
            return
        self._probed.update(unknown)
        one = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
               for k, v in inputs.items()}
        seen: dict[str, torch.Tensor] = {}

        def record(name):
            def hook(module, args, out) -> None:  # (returns nothing: the output stays the module's)
                seen.setdefault(name, args[0] if args and isinstance(args[0], torch.Tensor) else out)
            return hook
        handles = [site_module(self.model, n).register_forward_hook(record(n)) for n in unknown]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # (dropout's stream unmoved)
                self.model(**one)
        except Exception:  # a model this cannot run: its ambiguous sites stay unsplit (a clear error in `_delta`)
            return
        finally:
            for h in handles:
                h.remove()
        for name, x in seen.items():
            if isinstance(x, torch.Tensor):
                self._observe(name, x, 1)

    def _adapter_input(self, job: HostedJob, name: str, x: torch.Tensor, output: torch.Tensor,
                       ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The input the adapter sees — the site's input x (parallel) or its output h (sequential),
        after the adapter's dropout (the device fits that) —, each token's type (routing kinds) and
        the tokens it acts on (conditional kinds)."""
        adapter = job.adapters[name]
        route = adapter.route(x) if adapter.spec.routes else None  # types come from the site's own input
        if adapter.spec.attach == "sequential":
            x = output
        p = adapter.spec.dropout
        if p > 0 and ctx.capture:
            x = F.dropout(x, p, training=True)
        mask = ctx.mask if ctx.mask is not None and tuple(ctx.mask.shape) == tuple(x.shape[:2]) else None
        sel = adapter.select(x, mask)
        if ctx.capture:  # one detached tensor per distinct input, so shared inputs stay shared;
            # keyed by memory, not id(): a freed input's id may be reused within the forward
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            ctx.inputs[(job.spec.job_id, name)] = ctx.detached.setdefault(key, x.detach())
            if route is not None:
                ctx.routes[(job.spec.job_id, name)] = route
            if sel is not None:
                ctx.selected[(job.spec.job_id, name)] = sel
        return x, route, sel


def _call(adapter: Adapter, x: torch.Tensor, route: torch.Tensor | None, sel: torch.Tensor | None) -> torch.Tensor:
    """The adapter's delta on x; routing kinds also get each token's type; conditional kinds act only
    on their selected tokens (a 0/1 factor: the others get exactly zero, and no gradient through f).
    The adapter computes in its own dtype (float32 on a bf16 model, as PEFT does), as the device fits."""
    p = next(adapter.parameters(), None)
    if p is not None and x.is_floating_point() and x.dtype != p.dtype:
        x = x.to(p.dtype)
    delta = adapter(x) if route is None else adapter(x, route)
    return delta if sel is None else delta * sel.unsqueeze(-1).to(delta.dtype)
