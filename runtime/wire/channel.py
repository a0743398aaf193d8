"""The gRPC glue both sides use: channel and server options, the Work method's raw-bytes handlers.

Register and the control service use the generated stubs. Work carries framed messages
(`uint32 len | protobuf envelope | raw payload`) so tensor bytes skip protobuf entirely; the
method path and message types still come from proto/colaflow/v1/worker.proto.
"""
from __future__ import annotations

import grpc

from ..v1 import worker_pb2

SERVICE = "colaflow.v1.Worker"
WORK = f"/{SERVICE}/Work"
MAX_MESSAGE_BYTES = 64 << 20  # one gRPC message, either way, on every channel and server of colaflow
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.http2.max_frame_size", (1 << 24) - 1)]  # big HTTP/2 frames: ~2x loopback throughput
# A second server on a taken port must fail, not silently share it (gRPC's default is SO_REUSEPORT).
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)]


def channel(address: str, tls_ca: bytes | None = None) -> grpc.Channel:
    """A channel to a colaflow server with colaflow's options (TLS when `tls_ca` is given)."""
    if tls_ca is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def _identity(b: bytes) -> bytes:
    return b


def work_call(channel: grpc.Channel):
    """The client side of Work: send framed bytes, receive framed bytes."""
    return channel.stream_stream(WORK, request_serializer=_identity, response_deserializer=_identity)


def add_worker_service(server: grpc.Server, servicer) -> None:
    """Register `servicer.Register` (protobuf) and `servicer.Work` (framed bytes) on `server`."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register, request_deserializer=worker_pb2.RegisterRequest.FromString,
            response_serializer=worker_pb2.RegisterResponse.SerializeToString),
        "Work": grpc.stream_stream_rpc_method_handler(servicer.Work, request_deserializer=_identity,
                                                      response_serializer=_identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def tune_allocator(max_block: int = 256 << 20) -> bool:
    """Keep large buffers on glibc's heap instead of fresh mmaps (Linux only; else a no-op).

    Every 4 MiB message would otherwise be a new mapping whose pages fault in one by one:
    that page-faulting, not copying, dominated the send path (5x slower in our wire benchmark).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, max_block)) and bool(libc.mallopt(M_TRIM_THRESHOLD, max_block))
