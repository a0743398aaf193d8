"""`colaflow status JOB`: one job's state, step, loss, staleness and workers (`--json` for scripts)."""
from __future__ import annotations

import argparse
import json

from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show one job")
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        info = c.get(args.job)
    finally:
        c.close()
    if args.json:
        out(json.dumps(info.as_dict(), indent=2))
        return 0
    pct = f" ({100 * info.step // info.steps}%)" if info.steps else ""
    lines = [("Job", info.job), ("State", info.state), ("Step", f"{info.step}/{info.steps}{pct}"),
             ("Loss", f"{info.loss:.4f}" if info.step else "-"), ("Max staleness", str(info.max_staleness)),
             ("Workers", ", ".join(info.workers) or "-")]
    if info.error:
        lines.append(("Error", info.error))
    width = max(len(k) for k, _ in lines) + 1
    out("\n".join(f"{k + ':':<{width}} {v}" for k, v in lines))
    return 0
