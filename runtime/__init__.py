"""colaflow: fine-tune a frozen model as a service; devices do the gradient learning (ColA)."""
from .adapters import MLP, Adapter, AdapterSpec, Linear, LowRank, adapter_kinds, build_adapter, register_adapter
from .gl import Learner, LearnerState, OptimizerState, Packet, Update, fit
from .errors import ColaflowError, JobFailed, NoWorkers
from .host import Host
from .blackbox import BlackBoxHost
from .smalllm import SmallLM
from .job import JobSpec
from .optim import SGD, Adam, AdamW, Schedule, optimizer_kinds, register_optimizer
from .scheduler import Scheduler
from .session import Job, Session
from .sites import Site, find_sites
from .trainer import Trainer
from .worker import Worker

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Adapter", "AdapterSpec", "BlackBoxHost", "ColaflowError", "Host", "Job", "JobFailed",
           "JobSpec", "Learner", "LearnerState", "Linear", "LowRank", "MLP", "NoWorkers", "OptimizerState", "Packet", "SGD",
           "Schedule", "SmallLM", "Scheduler", "Session", "Site", "Trainer", "Update", "Worker", "adapter_kinds",
           "build_adapter", "find_sites", "fit", "optimizer_kinds", "register_adapter", "register_optimizer"]
