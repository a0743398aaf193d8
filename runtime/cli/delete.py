"""`colaflow delete JOB`: forget an ended job on the server — its status, metrics, adapters and state-dir
files. Export what you want to keep first; a live job must be cancelled first."""
from __future__ import annotations

import argparse

from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("delete", help="forget an ended job (its status, metrics, adapters, files)")
    p.add_argument("job")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        c.delete(args.job)
    finally:
        c.close()
    out(f"job {args.job} deleted")
    return 0
