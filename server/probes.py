"""Standard gRPC plumbing: health checking (grpc.health.v1) and server reflection, without tokens.

Probes (Kubernetes gRPC probes, load balancers, `grpcurl`) need neither colaflow's stubs nor a
token, so these services say only what the world may know: whether the server can go on
(SERVING / NOT_SERVING, for "" and each colaflow service alike) and the services' schemas (the
public .proto files). Nothing about jobs, tenants or workers.

NOT_SERVING while the coordinator's health is not "serving": the step loop failing (or given
up) or the state dir refusing writes. A watcher polls it and flips the status back when it
recovers, so `Watch` streams see both transitions.
"""
from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from colaflow.v1 import control_pb2
from colaflow.wire.channel import SERVICE as WORKER_SERVICE

from .coordinator import Coordinator

log = logging.getLogger("colaflow.server")
CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name
SERVICES = (CONTROL_SERVICE, WORKER_SERVICE)  # each gets a health status, as "" does
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Probes:
    """Health and reflection on a grpc.aio server; `watch()` keeps health true to the coordinator."""

    def __init__(self, coordinator: Coordinator, interval: float = 0.5):
        self.coordinator, self.interval = coordinator, interval
        self.health = HealthServicer()
        self.status: int | None = None

    def add_to(self, server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

    async def update(self) -> int:
        """Set every service's status from the coordinator's health now; returns it."""
        why = (await asyncio.to_thread(self.coordinator.health)).status  # the scheduler's lock: off the event loop
        status = SERVING if why == "serving" else NOT_SERVING
        if status != self.status:
            if self.status is not None or status != SERVING:
                log.log(logging.INFO if status == SERVING else logging.WARNING, "gRPC health: %s (%s)",
                        health_pb2.HealthCheckResponse.ServingStatus.Name(status), why)
            for service in ("", *SERVICES):
                await self.health.set(service, status)
            self.status = status
        return status

    async def watch(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self.interval)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING for good (the server is going away)."""
        await self.health.enter_graceful_shutdown()
