"""`colaflow cancel JOB`: stop a job; its adapters so far stay exportable."""
from __future__ import annotations

import argparse

from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        info = c.cancel(args.job)
    finally:
        c.close()
    out(f"job {info.job} {info.state} at step {info.step}/{info.steps}")
    return 0
