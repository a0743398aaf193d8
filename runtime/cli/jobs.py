"""`colaflow jobs`: the jobs this token sees, one line each (`--json`: a list of status maps)."""
from __future__ import annotations

import argparse
import json

from ._control import add_common, client, out, table


def add_parser(sub) -> None:
    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        infos = c.list()
    finally:
        c.close()
    if args.json:
        out(json.dumps([i.as_dict() for i in infos], indent=2))
    elif not infos:
        out("no jobs")
    else:
        out(table([row(i) for i in infos], ["JOB", "STATE", "STEP", "LOSS", "WORKERS", "ERROR"]))
    return 0


def row(i) -> list[str]:
    """One job as table cells (shared with `colaflow status`)."""
    return [i.job, i.state, f"{i.step}/{i.steps}", f"{i.loss:.4f}" if i.step else "-",
            ",".join(i.workers) or "-", (i.error[:60] + "...") if len(i.error) > 60 else i.error]
