"""The wire: tensors to bytes, frames, protobuf <-> Python, and the gRPC glue both sides use.

    codec.py          the only place tensors become bytes: raw, bf16, fp16, int8, int4
    framing.py        envelope + raw payload frames, cut into <= 4 MiB chunks and reassembled
    serde.py          Work-stream messages <-> protobuf frames (colaflow.v1.worker)
    control_serde.py  control-service messages <-> protobuf (torch-free, for the client)
    channel.py        channel and server options, the Work method, the allocator tuning
    link.py           WorkerLink: the worker's side of the Work stream (edge daemon, Ray actor)
    client.py         Client: the control service from Python (torch-free)
    tokenizer.py      a tokenizer's files over the wire
"""
