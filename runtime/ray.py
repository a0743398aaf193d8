"""colaflow on Ray: worker actors on edge nodes, a server actor on the GPU node, a pool that scales.

    pip install "colaflow[ray]"
    import ray
    from colaflow.ray import RayServer, RayWorkerPool
    ray.init(address="auto")                                  # a cluster started with `ray up`
    server = RayServer("smollm2-135m")                        # `colaflow serve` on the GPU / `server` node
    pool = RayWorkerPool(server, n="all-edge-nodes")          # one worker actor per `edge` node
    session = colaflow.Session(address=server.address)       # submit, watch, export as anywhere else
    pool.scale(4); pool.stop(); server.stop()

A worker actor runs the same `colaflow.Worker` behind the same `WorkerLink` as the edge daemon,
over the same gRPC Work stream, so one cluster mixes Ray actors and stand-alone daemons (laptops
behind NAT). Actors keep nothing on disk: every `state_every` fits a learner's full state reaches
the server, so when Ray restarts an actor lost with its node (`max_restarts`), or when its sites
move to another actor, the job continues exactly. Every call here has a timeout.
"""
from __future__ import annotations

import importlib
import logging
import threading

try:
    import ray
except ImportError as e:  # Ray is an optional extra: everything else imports without it
    raise ImportError("colaflow.ray needs Ray: pip install 'colaflow[ray]'") from e

from .errors import Unavailable

NAMESPACE = "colaflow"
SERVER_NAME = "colaflow-server"
SERVER_ACTOR = "colaflow.server.ray"  # the server actor lives with the service
log = logging.getLogger("colaflow.ray")


class _WorkerActor:
    """A Ray actor around one Worker and its WorkerLink (the link runs in a thread of the actor)."""

    def __init__(self, worker_id: str, address: str, server_name: str | None, token: str | None, threads: int):
        import torch

        from .control.worker import Worker
        from .wire.channel import tune_allocator
        from .wire.link import WorkerLink

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        torch.set_num_threads(threads)
        tune_allocator()

        def resolve() -> str:  # the server actor may have moved (restarted elsewhere): ask it each time
            if server_name is None:
                return address
            try:
                actor = ray.get_actor(server_name, namespace=NAMESPACE)
                return ray.get(actor.address.remote(), timeout=30)
            except Exception:  # not reachable now: try the last known address, the link backs off
                return address
        self.worker = Worker(worker_id)
        self.link = WorkerLink(resolve, self.worker, token)
        self.thread = threading.Thread(target=self.link.run, name="colaflow-link", daemon=True)
        self.thread.start()

    def connected(self, timeout: float) -> bool:
        return self.link.connected.wait(timeout)

    def info(self) -> dict:
        return {"worker": self.worker.worker_id, "node": ray.get_runtime_context().get_node_id(),
                "connected": self.link.connected.is_set(), "fits": self.worker.fits,
                "learners": len(self.worker.learners), "healthy": self.worker.healthy}

    def leave(self, timeout: float) -> bool:
        """Say goodbye for good (the server moves this worker's sites at once) and stop."""
        self.link.stop(leaving=True)
        self.thread.join(timeout)
        return not self.thread.is_alive()


def held_args(dtype: str | None = None, quantize: str | None = None, device_map=None,
              checkpointing: bool = False, max_memory: str | None = None) -> tuple[str, ...]:
    """`colaflow serve`'s options for how the server holds its model (see `colaflow.models.load`)."""
    import json

    args: list[str] = []
    for flag, value in (("--dtype", dtype), ("--quantize", quantize), ("--max-memory", max_memory)):
        if value is not None:
            args += [flag, str(value)]
    if device_map is not None:
        args += ["--device-map", device_map if isinstance(device_map, str) else json.dumps(device_map)]
    return (*args, "--checkpointing") if checkpointing else tuple(args)


def _nodes_with(resource: str) -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) >= 1)


class RayServer:
    """`colaflow serve` in a Ray actor, on the node with the `server` resource, else a GPU, else anywhere.

    The server runs in the actor's own process (`colaflow.server.ray.ServerActor`, named here: the
    library never imports the service): if it dies, so does the actor, and its log is the actor's.
    """

    def __init__(self, model: str = "smollm2-135m", *, args: tuple[str, ...] = (), host: str | None = None,
                 resources: dict | None = None, name: str = SERVER_NAME, timeout: float = 600.0,
                 dtype: str | None = None, quantize: str | None = None, device_map=None,
                 checkpointing: bool = False, max_memory: str | None = None):
        args = (*held_args(dtype, quantize, device_map, checkpointing, max_memory), *args)
        total = ray.cluster_resources()
        options: dict = {"name": name, "namespace": NAMESPACE, "num_cpus": 0, "max_restarts": 0}
        if resources is not None:
            options["resources"] = resources
        elif total.get("server", 0) >= 1:
            options["resources"] = {"server": 1}
        elif total.get("GPU", 0) >= 1:
            options["num_gpus"] = 1
            if "--device" not in args:  # the GPU it reserves is the one it serves on
                args = [*args, "--device", "cuda"]
        self.name, self.timeout = name, timeout
        actor_cls = importlib.import_module(SERVER_ACTOR).ServerActor
        self.actor = ray.remote(actor_cls).options(**options).remote(model, list(args), host)
        try:
            self.address: str = ray.get(self.actor.address.remote(), timeout=timeout)
        except Exception as e:
            ray.kill(self.actor)
            raise Unavailable(f"the colaflow server actor did not start within {timeout:.0f} s: {e}") from None
        log.info("colaflow server on Ray at %s", self.address)

    def alive(self) -> bool:
        """Whether the server answers (its actor lives, and serves or says why not)."""
        try:
            ray.get(self.actor.health.remote(), timeout=30)
            return True
        except Exception:
            return False

    def health(self) -> str:
        """"serving", or why not."""
        return ray.get(self.actor.health.remote(), timeout=30)

    def logs(self, lines: int = 200) -> str:
        """The last `lines` of the server's log (the whole of it is the actor's: `ray logs`)."""
        return ray.get(self.actor.logs.remote(lines), timeout=30)

    def stop(self) -> None:
        try:
            ray.get(self.actor.stop.remote(), timeout=60)
        finally:
            ray.kill(self.actor)


class RayWorkerPool:
    """Worker actors, one per device with `resources` (default: the custom resource `edge`).

    `n` is a count or "all-edge-nodes" (one per live node offering the resource). `scale(n)` adds
    or retires actors while jobs run: new ones take new work; retired ones say goodbye for good,
    so their sites move at once, with their learners' state, to the others.
    """

    def __init__(self, server: RayServer | str, n: int | str = "all-edge-nodes", *, resources: dict | None = None,
                 token: str | None = None, threads: int = 1, prefix: str = "ray-worker", timeout: float = 120.0):
        self.resources = {"edge": 1} if resources is None else dict(resources)
        self.address = server.address if isinstance(server, RayServer) else server
        self.server_name = server.name if isinstance(server, RayServer) else None
        self.token, self.threads, self.prefix, self.timeout = token, threads, prefix, timeout
        for resource, amount in self.resources.items():
            if ray.cluster_resources().get(resource, 0) < amount:
                raise Unavailable(f"no node offers the `{resource}` resource: start edge nodes with "
                                  f"`ray start --address=... --resources='{{\"{resource}\": 1}}'` (or pass resources=)")
        self.actors: list = []
        self.scale(_nodes_with(next(iter(self.resources), "CPU")) if n == "all-edge-nodes" else int(n))

    @property
    def size(self) -> int:
        return len(self.actors)

    def scale(self, n: int) -> None:
        """Grow or shrink to `n` actors; returns once the new ones are connected (or raises after `timeout`)."""
        if n < 0:
            raise ValueError(f"`n` must be >= 0, got {n}")
        new = []
        while len(self.actors) < n:
            worker_id = f"{self.prefix}-{len(self.actors)}"
            actor = ray.remote(_WorkerActor).options(
                name=worker_id, namespace=NAMESPACE, num_cpus=0, resources=self.resources, max_restarts=-1,
            ).remote(worker_id, self.address, self.server_name, self.token, self.threads)
            self.actors.append(actor)
            new.append(actor)
        while len(self.actors) > n:
            self._retire(self.actors.pop())
        if new:
            self.wait_connected(new)

    def wait_connected(self, actors: list | None = None) -> None:
        actors = self.actors if actors is None else actors
        refs = [a.connected.remote(self.timeout) for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
        if pending or not all(ray.get(done, timeout=10)):
            raise Unavailable(f"{len(pending) or len(actors)} of {len(actors)} worker actors did not connect to "
                              f"{self.address} within {self.timeout:.0f} s (not enough `{list(self.resources)}` "
                              "resources, or the server is unreachable from the nodes)")

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors], timeout=self.timeout)

    def _retire(self, actor) -> None:
        try:
            ray.get(actor.leave.remote(30.0), timeout=60)
        except Exception as e:  # already gone: the server moves its sites after --reassign-after
            log.warning("a worker actor did not leave cleanly: %s", e)
        ray.kill(actor, no_restart=True)

    def stop(self) -> None:
        while self.actors:
            self._retire(self.actors.pop())


class RayDeployment:
    """What `Session(ray=...)` starts: a RayServer and a RayWorkerPool (and Ray itself, if needed)."""

    def __init__(self, model: str, workers: int | str = 2, address: bool | str = True, threads: int = 1,
                 server_threads: int | None = None, server_args: tuple[str, ...] = ()):
        if workers != "all-edge-nodes" and not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"`workers` must be a count >= 1 or 'all-edge-nodes', got {workers!r}")
        self.started_ray = not ray.is_initialized()
        local = address is True
        if self.started_ray:
            if local:  # a local instance for this process, its CPU offering the resources we need
                n = workers if isinstance(workers, int) else 2
                ray.init(address="local", namespace=NAMESPACE, resources={"edge": n, "server": 1},
                         include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, namespace=NAMESPACE)
        try:
            self.server = RayServer(model, args=("--threads", str(server_threads or threads), *server_args),
                                    host="127.0.0.1" if local else None)
            try:
                self.pool = RayWorkerPool(self.server, workers, threads=threads)
            except BaseException:
                self.server.stop()
                raise
        except BaseException:
            if self.started_ray:
                ray.shutdown()
            raise
        self.address = self.server.address
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.pool.stop()
            self.server.stop()
        finally:
            if self.started_ray:
                ray.shutdown()
