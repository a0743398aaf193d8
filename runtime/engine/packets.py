"""Site gradients into packets during the backward (`Host.step`'s stream), one input group at a time.

A group (the sites of one job that read one input) leaves as soon as its last gradient exists:
its x and g are cut to the tokens that carry gradient, checked, and handed to `emit`; the step
keeps nothing of it. On a GPU the group is copied to pinned host memory without waiting and a
host thread checks and emits it, so the backward never synchronises per site.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import torch

from ..learn.messages import Packet
from .hosted import HostedJob, StepContext


class PacketStream:
    """Turns site gradients into packets during the backward, one input group at a time.

    Sites of a job that read one input share its tensor on the wire and one token mask, so a
    group's packets leave when the last of its gradients exists; each g and x is dropped then.
    """

    def __init__(self, jobs: dict[str, HostedJob], ctx: StepContext, losses: dict[str, torch.Tensor],
                 emit: Callable[[list[Packet]], None], packer: Callable[[], Executor]):
        self.jobs, self.ctx, self.losses, self.emit = jobs, ctx, losses, emit
        self.packer = packer  # one thread that checks, cuts and emits copied-out device tensors, in order
        self.grads: dict[str, torch.Tensor] = {}
        self.waiting: dict[tuple[str, int], set[str]] = {}  # (job, group) -> sites still without g
        self.groups: dict[tuple[str, int], list[str]] = {}  # (job, input number) -> the sites reading it
        self.of_site: dict[str, list[tuple[str, int]]] = {}
        self.copying: list = []  # futures of the groups whose device-to-host copies are in flight
        self.pending: set[tuple[str, int]] = set()  # groups whose g are in, whose input its recompute has yet to keep
        self.failed = False
        for job_id in ctx.rows:
            by_input: dict[int, list[str]] = {}
            for name in jobs[job_id].sites:
                by_input.setdefault(ctx.captured.group[(job_id, name)], []).append(name)
            for i, group in by_input.items():
                self.groups[(job_id, i)], self.waiting[(job_id, i)] = group, set(group)
                for name in group:
                    self.of_site.setdefault(name, []).append((job_id, i))

    def grad(self, name: str, g: torch.Tensor) -> None:
        self.grads[name] = g.detach()
        for key in self.of_site.get(name, []):
            self.waiting[key].discard(name)
            if not self.waiting[key]:
                self._ready(key)

    def _ready(self, key: tuple[str, int]) -> None:
        """Every g of the group is in: send it, or — checkpointed, a site's output gradient can come
        before its block runs again — once that recompute has kept its input."""
        if self.ctx.checkpointing and key not in self.ctx.captured.inputs:
            self.pending.add(key)
        else:
            self._send(key)

    def input_kept(self, key: tuple[str, int]) -> None:
        """A checkpointed block's recompute kept the input `key` ((job, input number)): its group may go."""
        if key in self.pending:
            self.pending.discard(key)
            self._send(key)

    def finish(self) -> None:
        """Send the groups whose sites got no gradient at all (zero g: unused by every loss), and wait
        for the copies still in flight."""
        for key in [k for k, left in self.waiting.items() if left] + sorted(self.pending):
            for name in list(self.waiting.get(key, ())):
                shape, dtype, device = self.ctx.shapes[name]
                self.grads.setdefault(name, torch.zeros(shape, dtype=dtype, device=device))
            self.pending.discard(key)
            self._send(key)
        for copied in self.copying:
            copied.result()  # raises the first group's error, if any

    def _send(self, key: tuple[str, int]) -> None:
        job_id, _ = key
        group = self.groups.pop(key)
        del self.waiting[key]
        rows, kept = self.ctx.rows[job_id], self.ctx.captured
        kept.sent.add(key)
        x = kept.inputs.pop(key, None)  # (checkpointed: kept by the block's recompute, just now)
        if x is None:  # a checkpointed block no gradient reached never ran again: its g are all zero, and
            shape, dtype, device = kept.forms[key]  # its packets carry no token, whatever x held
            x = torch.zeros(shape, dtype=dtype, device=device)
        x = _rows(x, rows)
        gs = {n: _rows(self.grads[n], rows) for n in group}
        rs = {n: _rows(kept.routes[(job_id, n)], rows) for n in group if (job_id, n) in kept.routes}
        # a conditional adapter's unselected tokens add nothing to J^T g: they stay on the server
        # (their g is zeroed for the packet only, so the token cut below drops them; the backward is untouched)
        gs = {n: g * _rows(kept.selected[(job_id, n)], rows).unsqueeze(-1).to(g.dtype)
              if (job_id, n) in kept.selected else g for n, g in gs.items()}
        for n in group:
            kept.routes.pop((job_id, n), None)
            kept.selected.pop((job_id, n), None)
            self.of_site[n] = [k for k in self.of_site[n] if k != key]
            if not self.of_site[n]:  # a g no other job's group still waits for is released now
                self.grads.pop(n, None)
        if self.jobs[job_id].spec.packets == "projected":  # the fit's statistics leave, not x and g
            gs = self._project(job_id, x, gs)
            x = None
        lead = x if x is not None else next(iter(gs.values()))["gsq"]
        if lead.is_cuda:  # copy out without waiting; a host thread checks, cuts and emits the copy, so the
            # backward's thread goes on launching kernels (no synchronisation per site)
            with torch.cuda.device(lead.device):  # `finish` runs on a thread whose current device may be 0
                x = None if x is None else _to_host(x)
                gs = {n: {k: _to_host(t) for k, t in g.items()} if isinstance(g, dict) else _to_host(g)
                      for n, g in gs.items()}
                rs = {n: _to_host(r) for n, r in rs.items()}
                event = torch.cuda.Event()
                event.record()
            self.copying.append(self.packer().submit(self._emit_copied, event, job_id, group, x, gs, rs))
        else:
            self._emit(job_id, group, x, gs, rs)

    def abort(self) -> None:
        """The step failed: nothing more of it leaves; wait for the copies in flight."""
        self.failed = True
        for copied in self.copying:
            copied.exception()

    def _emit_copied(self, event, job_id: str, group: list[str], x: torch.Tensor, gs: dict, rs: dict) -> None:
        event.synchronize()
        if not self.failed:  # after a bad group, nothing more of this step leaves
            try:
                self._emit(job_id, group, x, gs, rs, pinned=True)
            except BaseException:
                self.failed = True
                raise

    def _project(self, job_id: str, x: torch.Tensor, gs: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Each site's statistics of its tokens (`Adapter.project`, with the server's copy: at staleness
        0 the very version the device fits) and its GL loss 0.5 ||g||^2. Tokens with zero g add nothing."""
        adapters, x2 = self.jobs[job_id].adapters, x.reshape(-1, x.shape[-1])  # (N, in)
        out = {}
        for n, g in gs.items():
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            with torch.no_grad():
                out[n] = {**adapters[n].project(x2, g2), "gsq": 0.5 * g2.double().pow(2).sum().reshape(1).float()}
        return out

    def _emit(self, job_id: str, group: list[str], x: torch.Tensor | None, gs: dict,
              rs: dict[str, torch.Tensor], pinned: bool = False) -> None:
        job, step = self.jobs[job_id], self.ctx.steps.get(job_id, 0)
        if x is None:  # projected: a handful of small tensors per site
            for n, stats in gs.items():
                bad = next((k for k, t in stats.items() if not torch.isfinite(t).all()), None)
                if bad is not None:
                    raise FloatingPointError(f"site `{n}`: statistic `{bad}` of job {job_id!r} at step {step} "
                                             f"holds NaN or Inf (loss {float(self.losses[job_id].detach()):.4g})")
            self.emit([Packet(job_id, n, step, job.versions[n], None, None, None,
                              {k: t.clone() if pinned else t for k, t in gs[n].items()}) for n in group])
            return
        for n, g in gs.items():
            if not torch.isfinite(g).all():
                raise FloatingPointError(f"site `{n}`: gradient of job {job_id!r} at step {step} "
                                         f"holds NaN or Inf (loss {float(self.losses[job_id].detach()):.4g})")
        keep = _live_tokens(x, list(gs.values()), [job.sites[n].kind for n in group])
        cut = {n: _cut(g, keep) for n, g in gs.items()}
        xs = _cut(x, keep)
        routes = {n: _cut(r, keep) for n, r in rs.items()}  # (N,): one type per kept token
        if pinned:  # packets may be kept for a while: they must not hold page-locked staging memory
            xs = xs.clone() if xs.data_ptr() == x.data_ptr() else xs
            cut = {n: c.clone() if c.data_ptr() == gs[n].data_ptr() else c for n, c in cut.items()}
            routes = {n: c.clone() if c.data_ptr() == rs[n].data_ptr() else c for n, c in routes.items()}
        self.emit([Packet(job_id, n, step, job.versions[n], xs, cut[n], routes.get(n)) for n in group])


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of a device tensor into pinned host memory (valid once its event is done)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A job's rows of a site tensor (all of them for a single-job batch)."""
    t = t.detach()
    return t if rows is None else t[rows]


def _live_tokens(x: torch.Tensor, gs: list[torch.Tensor], kinds: list[str]) -> torch.Tensor | None:
    """(B, T) mask of the tokens where any of the sites reading `x` has a nonzero gradient.

    Adapters act token by token, so a token whose g is zero adds exactly nothing to J^T g: it
    need not travel. This cuts padding (either side) and tokens no loss depends on, for every
    sequence of every architecture (encoder, decoder, cross-attention) without knowing which mask
    belongs to which sequence. None: not token-shaped (conv2d, per-row outputs); send everything.
    """
    if any(k not in ("linear", "conv1d", "embedding") for k in kinds):
        return None
    if any(g.dim() < 3 or tuple(g.shape[:2]) != tuple(x.shape[:2]) for g in gs):
        return None
    keep = gs[0].flatten(2).ne(0).any(-1)  # (B, T)
    for g in gs[1:]:
        keep |= g.flatten(2).ne(0).any(-1)
    return keep


def _cut(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(N, ...) rows of the kept tokens: a view when every token is kept, a copy otherwise."""
    if keep is None:
        return t
    return t.flatten(0, 1) if bool(keep.all()) else t[keep]
