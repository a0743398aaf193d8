"""The Ray server actor: `colaflow serve` in the actor's own process — the coordinator, its step
thread and the gRPC services live here, as Ray Serve's controller holds its state in its actor.
If the server dies, the actor dies with it (and Ray restarts it, where `max_restarts` says), and
`ray logs` shows the server's log. `colaflow.ray.RayServer` starts it by name.
"""
from __future__ import annotations

import collections
import logging
import os
import threading

import ray

from .app import Serving
from .cli import parse

log = logging.getLogger("colaflow.server")


class _Recent(logging.Handler):
    """The newest lines of the server's log, for `RayServer.logs` (the whole log is the actor's: `ray logs`)."""

    def __init__(self, lines: int = 10_000):
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class ServerActor:
    def __init__(self, model: str, args: list[str], host: str | None):
        fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
        logging.basicConfig(level=logging.INFO, format=fmt)
        self.recent = _Recent()
        self.recent.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(self.recent)
        host = host or ray.util.get_node_ip_address()
        self.serving = Serving(parse(["--model", model, "--host", host, "--port", "0", *args]))
        threading.Thread(target=self._watch, name="colaflow-watch", daemon=True).start()

    def _watch(self) -> None:
        """The step loop gave up: the process goes, so Ray sees a dead actor rather than a live husk."""
        self.serving.done.wait()
        if self.serving.coordinator.fatal:
            log.critical("the server's step loop gave up (%s); the actor exits", self.serving.coordinator.fatal)
            os._exit(1)

    def address(self) -> str:
        return self.serving.address

    def health(self) -> str:
        return self.serving.coordinator.health().status

    def logs(self, lines: int) -> str:
        return "\n".join(list(self.recent.lines)[-lines:])

    def stop(self) -> int:
        return self.serving.stop()
