"""What the operator subcommands (submit, jobs, status, logs, cancel, workers, export) share: the
server and token options, the client they make, one-line errors, and table printing."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:7000"


class UsageError(Exception):
    """A bad option value: `colaflow: error: ...` and exit code 2, like argparse's own."""


def add_common(p: argparse.ArgumentParser) -> None:
    """--server, --token, --token-file, --tls-ca, --debug: every subcommand that talks to a server."""
    g = p.add_argument_group("server")
    g.add_argument("--server", help=f"HOST:PORT of `colaflow serve` (env COLAFLOW_SERVER; default {DEFAULT_SERVER})")
    g.add_argument("--token", help="control or admin token (env COLAFLOW_TOKEN)")
    g.add_argument("--token-file", help="file holding the token (instead of --token)")
    g.add_argument("--tls-ca", help="CA certificate that signed the server's certificate (TLS; env COLAFLOW_TLS_CA)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def server(args: argparse.Namespace) -> str:
    """The server's HOST:PORT, refusing a missing port (never a silent default such as 443)."""
    value = args.server or os.environ.get("COLAFLOW_SERVER") or DEFAULT_SERVER
    return checked_address(value, "--server" if args.server else "COLAFLOW_SERVER")


def checked_address(value: str, where: str) -> str:
    """`value` if it is HOST:PORT; gRPC would quietly dial port 443 for a bare host."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or host.endswith(":") and "[" not in host:
        raise UsageError(f"{where} {value!r} has no port: pass HOST:PORT (e.g. {value.split(':')[0] or 'HOST'}:7000)")
    return value


def token(args: argparse.Namespace) -> str | None:
    if args.token and args.token_file:
        raise UsageError("pass --token or --token-file, not both")
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as e:
            raise UsageError(f"cannot read --token-file {args.token_file!r}: {e.strerror}") from None
    return args.token or os.environ.get("COLAFLOW_TOKEN") or None


def tls_ca(args: argparse.Namespace) -> bytes | None:
    path = args.tls_ca or os.environ.get("COLAFLOW_TLS_CA")
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        flag = "--tls-ca" if args.tls_ca else "COLAFLOW_TLS_CA"
        raise UsageError(f"cannot read {flag} {path!r}: {e.strerror}") from None


def client(args: argparse.Namespace):
    from colaflow.wire.client import Client

    return Client(server(args), token=token(args), tls_ca=tls_ca(args))


def session(args: argparse.Namespace):
    from colaflow import Session

    return Session(address=server(args), token=token(args), tls_ca=tls_ca(args))


def explain(e: BaseException, args: argparse.Namespace) -> str:
    """The one line an operator reads for an error: what went wrong and what to do."""
    from colaflow.errors import NoToken, PermissionDenied, Unavailable, UnknownToken

    if isinstance(e, NoToken):
        return "the server requires a token: pass --token or set COLAFLOW_TOKEN"
    if isinstance(e, UnknownToken):
        return "the server does not know this token: check --token / --token-file / COLAFLOW_TOKEN"
    if isinstance(e, PermissionDenied) and "`worker` token" in str(e):
        return f"{e} (a worker token serves `colaflow edge`; operators use a control or admin token)"
    if isinstance(e, Unavailable) and hasattr(args, "tls_ca"):
        tls = "" if tls_ca(args) else "; a TLS server needs --tls-ca / COLAFLOW_TLS_CA"
        return (f"cannot reach the server at {server(args)} (is `colaflow serve` running? --server / COLAFLOW_SERVER"
                f"{tls}): {e}")
    text = " ".join(str(e).split()) or type(e).__name__
    from colaflow.errors import ColaflowError

    if isinstance(e, (ColaflowError, ValueError, OSError, UsageError)):
        return text
    return f"{type(e).__name__}: {text} (--debug shows the traceback)"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns left-aligned, two spaces apart, like `kubectl get`."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def out(text: str) -> None:
    print(text, flush=True)


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
