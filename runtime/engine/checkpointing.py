"""Activation checkpointing on the server: each block's activations are recomputed in the backward
instead of kept from the forward, as torchtune's and HF's `gradient_checkpointing` do.

The blocks are the model's repeated layers (HF's `GradientCheckpointingLayer`s, or the modules of
its longest `ModuleList`), each run under torch's non-reentrant checkpoint whatever the model's
train/eval mode (HF checkpoints only in training mode, where dropout would change the step). The
backward goes through the forward's own graph, so the site gradients leave exactly as before; the
recompute of a block runs right before its backward and is where the host keeps that block's site
inputs x (`StepContext.recomputing`), so they live only until their packets leave. On CPU the
captured x and g are bit for bit those of a step without checkpointing (tests/test_large.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")  # the names HF layers take a KV cache by

def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: HF's checkpointable layers, else its longest ModuleList's modules."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers, or none: the structure tells
        GradientCheckpointingLayer = ()
    found = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if found:
        outer = [m for m in found if not any(o is not m and m in set(o.modules()) for o in found)]
        return outer
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=len)) if lists else []


class Checkpointing:
    """Wraps each block's forward in a checkpoint while `active`; `recompute` is the context its replay
    runs in. The host turns it on per step (always, or where the step would not fit otherwise)."""

    def __init__(self, model: nn.Module, recompute: Callable[[], contextlib.AbstractContextManager]):
        # off but within its host's step: another host on the same model (a second Trainer) must not
        # find its blocks replayed under this one's hooks
        self.active = False
        self.blocks = blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no repeated blocks to checkpoint (no HF decoder "
                             "layers, no ModuleList of layers)")
        self.recompute = recompute
        self.inside = {m for block in self.blocks for m in block.modules()}  # modules whose forward is replayed
        # a block's own forward before the wrap (accelerate's hook wraps it on a device_map): `remove` restores it
        self._before = {block: block.__dict__.get("forward") for block in self.blocks}
        for block in self.blocks:
            block.forward = self._wrap(block.forward)

    def _wrap(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if not self.active or not torch.is_grad_enabled():  # (inference, an eval: nothing to replay)
                return forward(*args, **kwargs)
            for name in CACHES:  # the replay would write a cache a second time (the host passes use_cache=False)
                if kwargs.get(name) is not None:
                    kwargs[name] = None
            # the whole block runs again, not only up to its last saved tensor (torch's early stop): its
            # later site hooks keep their inputs then
            with set_checkpoint_early_stop(False):
                return checkpoint(forward, *args, use_reentrant=False,
                                  context_fn=lambda: (contextlib.nullcontext(), self.recompute()), **kwargs)
        return run

    def covers(self, module: nn.Module) -> bool:
        """Whether `module` runs inside a checkpointed block (else it runs once: its site keeps x then)."""
        return module in self.inside

    def remove(self) -> None:
        for block, before in self._before.items():
            if before is not None:
                block.forward = before  # accelerate's hook again, not the bare class forward
            elif "forward" in block.__dict__:
                del block.forward  # the class's own again
