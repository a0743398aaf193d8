"""colaflow.server: the adaptation server — model host, capture step, update applier."""
from .host import Host, StepResult

__all__ = ["Host", "StepResult"]
