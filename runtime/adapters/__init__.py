"""Adapters: the small trainable models a device owns, one per (job, site), a module per kind.

    base.py      AdapterSpec, Adapter, the registry (`register_adapter`, `build_adapter`), parameters
    lowrank.py   LowRank (LoRA)            linear.py   Linear (a full map)     mlp.py   MLP
    houlsby.py   Houlsby (bottleneck)      adalink.py  AdaLink (embeddings)    coda.py  CoDA (conditional)
    smalllm.py   SmallLM (black-box mode; its packet layout: topk.py)          head.py  WithHead (classifiers)
    merge.py     W + dW for inference, without drift

Importing the package registers every built-in kind (each module calls `register_adapter`), as
PEFT's `tuners/` does; a new kind is a module that does the same.
"""
from __future__ import annotations

from .adalink import AdaLink, AdaLinkAdapter
from .base import (
                   Adapter,
                   AdapterSpec,
                   adapter_kinds,
                   build_adapter,
                   check_params,
                   load_params,
                   param_shapes,
                   params_of,
                   register_adapter,
)
from .coda import CoDA, CoDAAdapter
from .head import WithHead
from .houlsby import Houlsby, HoulsbyAdapter
from .linear import Linear, LinearAdapter
from .lowrank import LowRank, LowRankAdapter
from .mlp import MLP, MLPAdapter
from .smalllm import SmallLM, SmallLMAdapter

__all__ = ["MLP", "AdaLink", "AdaLinkAdapter", "Adapter", "AdapterSpec", "CoDA", "CoDAAdapter", "Houlsby",
           "HoulsbyAdapter", "Linear", "LinearAdapter", "LowRank", "LowRankAdapter", "MLPAdapter", "SmallLM",
           "SmallLMAdapter", "WithHead", "adapter_kinds", "build_adapter", "check_params", "load_params",
           "param_shapes", "params_of", "register_adapter"]
