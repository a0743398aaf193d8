"""colaflow.edge_client: the worker daemon — a `colaflow.Worker` with its checkpoints on this device,
behind the same `colaflow.wire.link.WorkerLink` a Ray worker actor runs (see docs/architecture.md)."""
