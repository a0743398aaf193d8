"""colaflow.edge_client: the worker daemon. It runs `colaflow.gl.Learner` — the same fit as the
in-process `Trainer` — behind the gRPC transport (see docs/architecture.md)."""
