"""colaflow: fine-tune a frozen model as a service; devices do the gradient learning (ColA)."""
from .adapters import MLP, Adapter, AdapterSpec, Linear, LowRank, adapter_kinds, build_adapter, register_adapter
from .gl import Learner, Packet, Update, fit
from .job import JobSpec
from .optim import SGD, Adam, AdamW, Schedule
from .sites import Site, find_sites
from .trainer import Trainer

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Adapter", "AdapterSpec", "JobSpec", "Learner", "Linear", "LowRank", "MLP",
           "Packet", "SGD", "Schedule", "Site", "Trainer", "Update", "adapter_kinds", "build_adapter",
           "find_sites", "fit", "register_adapter"]
