"""What every servicer shares: one mapping from plain-Python errors to gRPC status codes, and the
checks of a call's token (its role) and of a worker id (well formed, this credential's)."""
from __future__ import annotations

import re

import grpc

from colaflow.errors import ColaflowError, ResourceExhausted

from .auth import Identity, Tokens

_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def status_code(e: Exception) -> grpc.StatusCode:
    """One mapping from plain-Python errors to gRPC status codes."""
    if type(e) is ColaflowError:  # a request this server cannot serve as it is (e.g. no tokenizer)
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(e, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, OSError):  # e.g. the state dir is full: retry later
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


async def identity(context, tokens: Tokens, role: str) -> Identity:
    identity = tokens.identity(context.invocation_metadata())
    if identity is None:
        # the caller knows whether it sent a token: saying which case this is tells it nothing new
        sent = dict(context.invocation_metadata() or ()).get("authorization", "").startswith("Bearer ")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{'unknown token' if sent else 'no token'}: this call needs a `{role}` token")
    if identity.role not in (role, "admin"):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"wrong role: this is a `{identity.role}` token; this call needs a `{role}` token")
    return identity


async def checked_worker_id(context, identity: Identity, worker_id: str) -> str:
    """The worker id, if it is well formed and this credential may use it."""
    if not _WORKER_ID.fullmatch(worker_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"`worker_id` {worker_id[:64]!r} must be 1-128 of [A-Za-z0-9._:@-]")
    if identity.role == "worker" and identity.name and worker_id != identity.name:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token is for worker {identity.name!r}")
    return worker_id
