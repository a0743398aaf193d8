"""colaflow.server: the service process — a thread and a lock around the scheduler, the capture step
on the model, the gRPC services, the job store and auth."""
