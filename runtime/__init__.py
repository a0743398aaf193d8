"""colaflow: fine-tune a frozen model as a service; devices do the gradient learning (ColA).

Names load on first use (PEP 562), so `colaflow jobs` and other operator commands answer without
importing torch; `from colaflow import LowRank` and `colaflow.Session` work as ever.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "bottleneck": ["AdaLink", "Houlsby"],
    "conditional": ["CoDA"],
    "blackbox": ["BlackBoxHost"],
    "smalllm": ["SmallLM"],
    "classify": ["WithHead", "classification_job", "classifier"],
    "adapters": ["MLP", "Adapter", "AdapterSpec", "Linear", "LowRank", "adapter_kinds", "build_adapter",
                 "register_adapter"],
    "gl": ["Learner", "LearnerState", "OptimizerState", "Packet", "Update", "fit"],
    "errors": ["ColaflowError", "JobFailed", "NoWorkers"],
    "host": ["Host"],
    "job": ["JobSpec"],
    "jobfile": ["load_job"],
    "optim": ["SGD", "Adam", "AdamW", "Schedule", "optimizer_kinds", "register_optimizer"],
    "scheduler": ["Scheduler"],
    "session": ["Job", "Session"],
    "sites": ["Site", "find_sites"],
    "trainer": ["Trainer"],
    "worker": ["Worker"],
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module 'colaflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE))
