"""Merging linear adapters into the frozen weights for inference, without drift.

    with merged(model, adapters):      # W <- W + dW for every site, computed out of place
        model.generate(...)            # adapted inference at the base model's cost
    # on exit W is restored bit for bit from the pristine copy taken on entry

The server's training forward never writes base weights at all (it passes W + dW through
`torch.func.functional_call`); this context is for inference and export.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..sites import site_module
from .base import Adapter


def merged_weights(model: nn.Module, adapters: dict[str, Adapter]) -> dict[str, torch.Tensor]:
    """{param name: W + dW} for every site, in the base weight's dtype; base weights untouched."""
    out = {}
    for name, adapter in adapters.items():
        if not adapter.spec.mergeable:
            raise ValueError(f"site `{name}`: a {adapter.spec.kind} adapter (dropout "
                             f"{getattr(adapter.spec, 'dropout', 0)}) cannot be merged")
        mod = site_module(model, name)
        dw, db = adapter.delta_weight()
        with torch.no_grad():
            # adapters may live on the host (an export, `Trainer.adapters`) and the model on a GPU
            out[f"{name}.weight"] = (mod.weight.float() + dw.to(mod.weight.device).float()).to(mod.weight.dtype)
            if db is not None:
                if mod.bias is None:
                    raise ValueError(f"site `{name}` has no bias to merge the adapter's bias into")
                out[f"{name}.bias"] = (mod.bias.float() + db.to(mod.bias.device).float()).to(mod.bias.dtype)
    return out


@contextlib.contextmanager
def merged(model: nn.Module, adapters: dict[str, Adapter]):
    """Temporarily write W + dW into `model`; restore the pristine weights on exit."""
    new = merged_weights(model, adapters)
    params = dict(model.named_parameters())
    pristine = {k: params[k].detach().clone() for k in new}
    try:
        with torch.no_grad():
            for k, v in new.items():
                params[k].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for k, v in pristine.items():
                params[k].copy_(v)
