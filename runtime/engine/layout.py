"""Which way round a site's input comes: a mixed batch splits a site by job only where its input
runs along the batch's rows first.

Its shape alone cannot always say: a sequence-first (T, B, H) input looks batch-first when T == B,
and an MoE expert's (tokens routed to it, H) when as many tokens as rows were. So a site is split
only on evidence: at the first mixed step one row of the batch runs once, without gradients
(`probe`), and each site's input must show the rows first there and in the step (a 2-D input at
both row counts), and never anything else.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sites import site_module


class RowLayout:
    def __init__(self):
        # site -> the row counts its input has shown along its first dimension; None: it showed
        # something else (sequence-first, tokens flattened or routed): never split by job
        self.seen: dict[str, set[int] | None] = {}
        self.probed: set[str] = set()  # sites a one-row forward has looked at

    def one_row_per_row(self, name: str, x: torch.Tensor, rows: int) -> bool:
        """Whether the site's input runs along the batch's rows first, so rows can be told apart: a 3-D
        input once seen with the rows first and not also second, a 2-D one at two row counts (the
        probe's one row and a step's), and never after it showed anything else."""
        seen = self.seen.get(name)
        if x.dim() == 0 or x.shape[0] != rows or not seen:
            return False
        return len(seen) >= 2 if x.dim() == 2 else True

    def observe(self, name: str, x: torch.Tensor, rows: int) -> None:
        seen = self.seen.setdefault(name, set())
        if seen is None or x.dim() == 0:
            return
        if x.shape[0] != rows:
            self.seen[name] = None
        elif x.dim() == 2 or x.shape[1] != rows:  # (B, B, ...) says nothing
            seen.add(rows)

    def probe(self, model: nn.Module, sites: list[str], inputs: dict, rows: int) -> None:
        """Before a mixed batch first splits sites whose layout is unknown: one row of it, once,
        shows which way round each site's input comes ((1, T, ...) or (T, 1, ...))."""
        unknown = [n for n in sites if n not in self.probed]
        if not unknown or rows < 2:
            return
        self.probed.update(unknown)
        one = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
               for k, v in inputs.items()}
        seen: dict[str, torch.Tensor] = {}

        def record(name):
            def hook(module, args, out) -> None:  # (returns nothing: the output stays the module's)
                seen.setdefault(name, args[0] if args and isinstance(args[0], torch.Tensor) else out)
            return hook
        handles = [site_module(model, n).register_forward_hook(record(n)) for n in unknown]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # (dropout's stream unmoved)
                model(**one)
        except Exception:  # a model this cannot run: its ambiguous sites stay unsplit (a clear error at the step)
            return
        finally:
            for h in handles:
                h.remove()
        for name, x in seen.items():
            if isinstance(x, torch.Tensor):
                self.observe(name, x, 1)
