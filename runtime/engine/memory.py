"""Memory the server can promise: what a job's step and its kept packets take, estimated before
anything is allocated, so a job that cannot fit is refused at submit — never an out-of-memory that
takes the other tenants' steps down with it.

    plan = estimate(model, sites, rows=8, tokens=512)    # bytes of one step, with and without recompute
    plan.step, plan.step_checkpointed, plan.packets      # activations; one step's packets (fp32 x and g)

A step keeps, per token and layer, what autograd saves to reach the site gradients through a frozen
block (no weight gradient: a frozen linear layer keeps only its weight), as counted for Llama-style blocks:
the two norms' inputs (2H), attention's q, k, v and output (2Q + 2K, Q = heads x head_dim), the MLP's
activation and product inputs (3I), and each site input until its packets leave; plus the head's
(B, T, H) gradient and one chunk of logits (the fused loss), and the backward's transient gradients.
Eager attention (no SDPA kernel) adds the (heads x T) probabilities (and their float32 softmax); a
loss not fused with the head, the whole logits. Checkpointing keeps one H per layer and token and
one block's activations at a time. Offloaded weights come in per block, but autograd keeps each one
it multiplied by: without checkpointing a step holds all of them. `SAFETY` covers what the count
leaves out (allocator slack, intermediate copies); tests/test_large.py holds the estimate above the
measured peak.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ResourceExhausted
from ..job import JobSpec
from ..sites import Site
from . import weights
from .checkpointing import blocks

SAFETY = 1.5
FIXED = 64 * 2**20  # the logits chunk of the fused loss, kernels' workspaces, the batch itself


@dataclass
class Plan:
    """Bytes a job needs: its step's peak (without and with checkpointing) and one step's packets."""

    step: int
    step_checkpointed: int
    packets: int

    def need(self, checkpointing: bool, kept_steps: int) -> int:
        return (self.step_checkpointed if checkpointing else self.step) + kept_steps * self.packets


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv: int  # key/value width (grouped-query attention: less than hidden)
    q: int  # query and attention-output width (heads x head_dim: more than hidden on Gemma, Qwen3)
    itemsize: int
    eager: bool  # attention probabilities kept (no fused SDPA kernel)


def shape_of(model: nn.Module) -> Shape:
    """The widths that set a step's activations, from the model's config (a generic guess without one)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 1024
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 16
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    itemsize = param.element_size() if param is not None else 4
    attn = getattr(cfg, "_attn_implementation", "eager")
    return Shape(hidden, getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden,
                 getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 12, heads,
                 kv_heads * head_dim, heads * head_dim, max(itemsize, 2), attn == "eager")


def estimate(model: nn.Module, sites: list[Site], rows: int, tokens: int, vocab: int = 0) -> Plan:
    """The memory of one step of `rows` x `tokens` on `model` adapting `sites` (see the module doc);
    `vocab`: the logits per token a loss not fused with the head makes whole (0: fused)."""
    s, n = shape_of(model), rows * tokens
    per_layer = 2 * s.hidden + 2 * s.q + 2 * s.kv + 3 * s.intermediate
    # eager attention keeps its (heads x T) probabilities, and below float32 the float32 softmax they came from
    probs = s.heads * tokens * (s.itemsize + (4 if s.itemsize < 4 else 0)) if s.eager else 0
    # unfused: the logits in the model's dtype, the float32 log-softmax the loss keeps, and two float32 gradients
    logits = vocab * (s.itemsize + 12)
    layers_of = {_layer(site.name) for site in sites}
    inputs = _site_inputs(sites)  # values of site inputs kept per token, over all layers
    head = s.hidden + 4 * s.hidden  # the head's input gradient, and the backward's transient gradients
    step = n * (s.itemsize * (s.layers * per_layer + head) + s.layers * probs + logits) + n * 4 * inputs
    # checkpointed: one H per layer and token (the block inputs), one block's activations at a time, and the
    # inputs of one layer's sites (the rest are kept only while their block runs again)
    one_layer = max(1, len(layers_of - {None})) if layers_of else 1
    step_ckpt = (n * (s.itemsize * (s.layers * s.hidden + per_layer + head) + probs + logits)
                 + n * 4 * math.ceil(inputs / one_layer))
    packets = n * 4 * (sum(site.out_features for site in sites) + inputs)  # g per site, x per input
    return Plan(int(SAFETY * step) + FIXED, int(SAFETY * step_ckpt) + FIXED, packets)


def packet_bytes(sites: list[Site], tokens: int, adapter) -> tuple[int, int]:
    """(full, projected) fp32 bytes of one step's packets: x once per input and g per site for every
    token, against each site's statistics (lowrank r (in + out), linear in x out)."""
    full = tokens * 4 * (sum(s.out_features for s in sites) + _site_inputs(sites))
    per_site = []
    for s in sites:
        # a classifier's WithHead: the body's kind at body sites, the head's at its own
        r = getattr(adapter.for_site(s.name) if hasattr(adapter, "for_site") else adapter, "r", None)
        per_site.append(r * (s.in_features + s.out_features) if r else s.in_features * s.out_features)
    return full, 4 * sum(per_site)


def _layer(name: str) -> str | None:
    m = re.search(r"\.(\d+)\.", name)
    return m.group(1) if m else None


def _site_inputs(sites: list[Site]) -> int:
    """Input values per token kept for packets: sites of one parent module read one input (q_proj and v_proj)."""
    by_parent: dict[str, int] = {}
    for site in sites:
        width = site.in_features if site.kind != "embedding" else 1
        parent = site.name.rpartition(".")[0]
        by_parent[parent] = max(by_parent.get(parent, 0), width)
    return sum(by_parent.values())


def kept_steps(spec: JobSpec) -> int:
    """Steps of packets the server may keep for a job: until durable learner state covers them
    (`fit_interval` x `state_every` steps), and `staleness` more the forward runs ahead."""
    return (spec.staleness + 1) * spec.fit_interval * max(spec.state_every, 1)


@dataclass
class Fit:
    """What a job was admitted with: its plan, whether its steps recompute, and the bytes it holds."""

    plan: Plan
    checkpointed: bool
    step: int  # while one of its steps runs (on the model's device)
    packets: int  # its kept packets (in host memory)


class Budget:
    """The memory a server may use (`--max-memory`, else its device's) and the jobs' share of it."""

    def __init__(self, model: nn.Module, mode, max_memory: int | None = None):
        self.model, self.mode = model, mode
        self.device = weights.input_device(model)
        self.total = max_memory if max_memory is not None else device_memory(self.device)
        self.host_total = max_memory if self.device.type == "cpu" and max_memory else device_memory(torch.device("cpu"))
        self.held = weights.describe(model)  # what it holds; the weights do not change
        # the weights on the device `total` is of (a device_map's other GPUs hold theirs in their own memory)
        self.weights = weights.resident_on(model, self.device)
        self.offloaded = self.held["weight_bytes"] - self.held["resident_bytes"]  # on disk or in a CPU map
        self.vocab = 0  # logits per token a step makes whole (no fused loss): the host sets it per job
        self.checkpointable = bool(blocks(model))  # "auto" can recompute only a model of repeated blocks

    def admit(self, spec: JobSpec, sites: list[Site], shape: tuple[int, int] | None,
              others: dict[str, Fit | None], vocab: int = 0) -> Fit | None:
        """The job's `Fit`, or `ResourceExhausted` saying what would fit; None when it cannot be sized
        (no batch shape: an in-process job driven batch by batch; no known memory). `vocab`: the logits
        per token its steps make whole (a loss not fused with the head; 0: fused)."""
        if shape is None or self.total is None:
            return None
        rows, tokens = shape
        self.vocab = vocab
        plan = self._plan(spec, sites, rows, tokens)
        packets = kept_steps(spec) * plan.packets
        fits = [f for f in others.values() if f is not None]
        options = [False, True] if self.mode == "auto" and self.checkpointable else [self.mode is True]
        for checkpointed in options:
            fit = Fit(plan, checkpointed, plan.step_checkpointed if checkpointed else plan.step, packets)
            if self._room(fits + [fit]) >= 0:
                return fit
        raise ResourceExhausted(self._refusal(spec, sites, rows, tokens, fits, options[-1]))

    def view(self, fits: list[Fit | None]) -> dict:
        """The model held and the memory promised to these jobs (the status page, /metrics)."""
        fits = [f for f in fits if f is not None]
        step = max((f.step for f in fits), default=0)
        return dict(self.held, max_memory=self.total, promised_step=step,
                    promised_packets=sum(f.packets for f in fits),
                    checkpointing={True: "on", False: "off"}.get(self.mode, self.mode))

    def _plan(self, spec: JobSpec, sites: list[Site], rows: int, tokens: int) -> Plan:
        plan = estimate(self.model, sites, rows, tokens, self.vocab)
        if self.offloaded:  # autograd keeps every offloaded weight it brought in; a replay, one block's
            plan.step += int(SAFETY * self.offloaded)
            plan.step_checkpointed += int(SAFETY * math.ceil(self.offloaded / shape_of(self.model).layers))
        if spec.packets == "projected":  # each site's statistics, whatever the tokens
            plan.packets = packet_bytes(sites, rows * tokens, spec.adapter)[1]
        return plan

    def _room(self, fits: list[Fit]) -> int:
        """Bytes to spare with these jobs: steps run one at a time; packets are kept together."""
        step = max((f.step for f in fits), default=0)
        packets = sum(f.packets for f in fits)
        if self.device.type == "cpu":
            return self.total - self.weights - step - packets
        if self.host_total is None:  # the machine's memory unknown (no sysconf): the device's alone
            return self.total - self.weights - step
        return min(self.total - self.weights - step, self.host_total - packets)

    def _refusal(self, spec: JobSpec, sites: list[Site], rows: int, tokens: int, fits: list[Fit],
                 checkpointed: bool) -> str:
        def fits_with(r: int, t: int) -> bool:
            plan = self._plan(spec, sites, r, t)
            fit = Fit(plan, checkpointed, plan.step_checkpointed if checkpointed else plan.step,
                      kept_steps(spec) * plan.packets)
            return self._room(fits + [fit]) >= 0
        max_rows = _most(lambda r: fits_with(r, tokens), rows - 1)
        max_tokens = next((t for t in _shorter(tokens) if fits_with(rows, t)), 0)
        plan = self._plan(spec, sites, rows, tokens)
        need = (plan.step_checkpointed if checkpointed else plan.step) + kept_steps(spec) * plan.packets
        hints = [f"{max_rows} rows of {tokens} tokens" if max_rows else "",
                 f"{rows} rows of at most {max_tokens} tokens" if max_tokens else ""]
        would = " or ".join(h for h in hints if h) or "no batch of this job's sites"
        ckpt = "" if checkpointed or self.mode is True or not self.checkpointable else (
            f"; with checkpointing (serve --checkpointing) its step needs {fmt(plan.step_checkpointed)}")
        kept = kept_steps(spec)
        return (f"job {spec.job_id!r} cannot fit this server's memory: {rows} rows x {tokens} tokens need about "
                f"{fmt(need)} (its step and {kept} step{'s' if kept > 1 else ''} of packets kept) and "
                f"{fmt(max(0, self._room(fits)))} "
                f"is free ({fmt(self.total)} in all, {fmt(self.weights)} of weights, {len(fits)} other jobs); "
                f"{would} would fit{ckpt}")


def _most(fits, n: int) -> int:
    """The largest of 1..n that `fits` (monotone: fewer fit too), 0 for none: a bisection, since a
    job's rows are its data's (a linear scan of 10**5 sizes would hold the host's lock for seconds)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _shorter(tokens: int):
    t = tokens
    while t > 1:
        t = max(1, t * 3 // 4)
        yield t


def device_memory(device: torch.device) -> int | None:
    """The memory of `device` (a GPU's total; the machine's RAM for the CPU), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
         "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'20GiB', '512MB', '1.5g', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"a memory size must be a number with an optional unit (KiB, MiB, GiB, MB, GB), got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
