"""colaflow: fine-tune a frozen model as a service; devices do the gradient learning (ColA).

Names load on first use (PEP 562), so `colaflow jobs` and other operator commands answer without
importing torch; `from colaflow import LowRank`, `colaflow.Session` and `colaflow.plot.write_png`
work as ever. The parts live in sub-packages: adapters, learn, engine, control, wire, data (see
docs/architecture.md).
"""
from __future__ import annotations

import importlib

_WHERE = {
    "adapters": ["MLP", "AdaLink", "Adapter", "AdapterSpec", "CoDA", "Houlsby", "Linear", "LowRank", "SmallLM",
                 "WithHead", "adapter_kinds", "build_adapter", "register_adapter"],
    "engine.blackbox": ["BlackBoxHost"],
    "engine.classify": ["classification_job", "classifier"],
    "learn.messages": ["LearnerState", "OptimizerState", "Packet", "Update"],
    "learn.learner": ["Learner"],
    "learn.fit": ["fit"],
    "learn.optim": ["SGD", "Adam", "AdamW", "Schedule", "optimizer_kinds", "register_optimizer"],
    "errors": ["ColaflowError", "JobFailed", "NoWorkers"],
    "engine.host": ["Host"],
    "job": ["JobSpec"],
    "data.jobfile": ["load_job"],
    "control.scheduler": ["Scheduler"],
    "control.trainer": ["Trainer"],
    "control.worker": ["Worker"],
    "session": ["Job", "Session"],
    "sites": ["Site", "find_sites"],
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
# modules people reach as attributes (`colaflow.plot.write_png(...)` after `import colaflow`)
_SUBMODULES = {"adapters", "bench", "checks", "cli", "client", "control", "data", "datasets", "engine", "errors",
               "evaluate", "export", "files", "job", "learn", "local", "loss", "maps", "models", "plot", "ray",
               "session", "sites", "studies", "v1", "wire"}

__version__ = "0.1.0"
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it here too
    if name not in _MODULE:
        raise AttributeError(f"module 'colaflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE) | _SUBMODULES)
