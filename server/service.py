"""The gRPC service of `colaflow serve`: the worker and control servicers, health and reflection, on a
grpc.aio server with its own event-loop thread, started and stopped from ordinary threads.

    served, port = make_server(coordinator, tokens, "127.0.0.1:0")
    served.start(); ...; served.stop(2)
"""
from __future__ import annotations

import asyncio
import threading

import grpc

from colaflow.v1 import control_pb2_grpc
from colaflow.wire.channel import SERVER_OPTIONS, add_worker_service

from .auth import Tokens
from .control_service import ControlService
from .coordinator import Coordinator
from .probes import Probes
from .uploads import UploadLimits
from .worker_service import WorkerService


class Served:
    """A grpc.aio server on its own event-loop thread, started and stopped from ordinary threads."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, address: str,
                 tls: tuple[bytes, bytes, bytes | None] | None, model_name: str | None, tokenizer=None,
                 upload_limits: UploadLimits | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="colaflow-grpc", daemon=True)
        self.thread.start()
        self.probes = Probes(coordinator)
        self._watch: asyncio.Future | None = None
        self.control = ControlService(coordinator, tokens, model_name, tokenizer, upload_limits)
        self.server, self.port = self._run(self._build(coordinator, tokens, address, tls))

    def _run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self, coordinator, tokens, address, tls):
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self.worker = WorkerService(coordinator, tokens, asyncio.get_running_loop())
        add_worker_service(server, self.worker)
        control_pb2_grpc.add_ControlServicer_to_server(self.control, server)
        self.probes.add_to(server)  # grpc.health.v1 and reflection: no token, nothing about jobs
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                key, cert, client_ca = tls
                creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                                    require_client_auth=client_ca is not None)
                port = server.add_secure_port(address, creds)
        except RuntimeError:
            port = 0
        return server, port

    def start(self) -> None:
        self._run(self.probes.update())  # the first probe already tells the truth
        self._run(self.server.start())
        self._watch = asyncio.run_coroutine_threadsafe(self.probes.watch(), self.loop)

    def stop(self, grace: float | None = None) -> None:
        try:
            if self._watch is not None:
                self._watch.cancel()
                self._run(self.probes.shutdown())
            self._run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def make_server(coordinator: Coordinator, tokens: Tokens, address: str = "127.0.0.1:0",
                tls: tuple[bytes, bytes, bytes | None] | None = None,
                model_name: str | None = None, tokenizer=None,
                upload_limits: UploadLimits | None = None) -> tuple[Served, int]:
    """A gRPC server with the worker and control services, health and reflection; returns it (not
    started) and its bound port.

    `tokenizer` (the model's, or None) is what GetTokenizer hands clients; `upload_limits` bound UploadData.
    """
    served = Served(coordinator, tokens, address, tls, model_name, tokenizer, upload_limits)
    if served.port == 0:
        served.stop(0)
        raise OSError(f"cannot listen on {address}: the port is taken (another colaflow serve?) or the "
                      "address is not this machine's")
    return served, served.port
