"""colaflow's own exceptions: what a caller of `Session`, `Job` or `Client` catches (never grpc.RpcError).

Each says what went wrong and, where there is one, what to do next.
"""
from __future__ import annotations


class ColaflowError(Exception):
    """Base of every error colaflow raises to its callers."""


class InvalidArgument(ColaflowError, ValueError):
    """The request was refused as malformed: a spec, a data row, a format."""


class NotFound(ColaflowError, KeyError):
    """No such job (or no such thing) on the server."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Unauthenticated(ColaflowError, PermissionError):
    """No token, or one the server does not know."""


class NoToken(Unauthenticated):
    """The server requires a token and the call carried none."""


class UnknownToken(Unauthenticated):
    """The call carried a token the server does not know (mistyped, revoked, another server's)."""


class PermissionDenied(ColaflowError, PermissionError):
    """A token the server knows, but of the wrong role (a worker's site that is not its own)."""


class ResourceExhausted(ColaflowError):
    """A limit of the server was reached (registered workers, a frame's size)."""


class Unavailable(ColaflowError, ConnectionError):
    """The server cannot be reached (or timed out); retrying later may work."""


class NoWorkers(ColaflowError, TimeoutError):
    """A job waits for devices and none is connected."""


class JobFailed(ColaflowError, RuntimeError):
    """The job ended failed or cancelled; the message carries the server's reason."""


def from_rpc(e, what: str = "") -> ColaflowError:
    """The colaflow exception for a grpc.RpcError (imported lazily: this module needs no gRPC)."""
    import grpc

    code, details = e.code(), e.details() or ""
    prefix = f"{what}: " if what else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:  # the server says "no token: ..." or "unknown token: ..."
        if details.startswith("unknown token"):
            return UnknownToken(f"{prefix}{details} (check the token you pass)")
        return NoToken(f"{prefix}{details or 'no token'} (pass token=... or --token-file)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{prefix}{details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{prefix}{details}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(f"{prefix}{details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{prefix}{details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{prefix}server unavailable ({code.name}: {details})")
    return ColaflowError(f"{prefix}{code.name}: {details}")
