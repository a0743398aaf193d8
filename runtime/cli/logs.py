"""`colaflow logs JOB [--follow]`: a line per step (step, loss first, then every other metric), the
job's events, and how it ended. With --follow the exit code says how: 0 done, 1 failed or cancelled."""
from __future__ import annotations

import argparse
import json
import time

from ..control.status import ENDED
from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="print a job's per-step metrics and events")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--json", action="store_true", help="one JSON map per line")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        rows = c.metrics(args.job) if args.follow else c.metrics_so_far(args.job)
        for m in rows:
            out(json.dumps(m) if args.json else line(m))
            if not args.json:
                for event in m.get("events", []):
                    out(f"  event: {event}")
        info = c.get(args.job)
    finally:
        c.close()
    if info.state not in ENDED:
        return 0
    if args.json:
        out(json.dumps({"ended": info.state, "error": info.error}))
    else:
        why = f": {info.error}" if info.error and info.error != info.state else ""  # not "cancelled: cancelled"
        out(f"job {info.job} ended: {info.state}{why}")
    return 0 if info.state == "done" or not args.follow else 1


def line(m: dict) -> str:
    """`step 3  loss 2.3141  tokens 96  ...`: every key of the map, whoever added it."""
    keys = [k for k in ("step", "loss") if k in m] + [k for k in m if k not in ("step", "loss", "events")]
    return "  ".join(f"{k} {_fmt(k, m[k])}" for k in keys)


def _fmt(key: str, v) -> str:
    if key == "time" and isinstance(v, (int, float)):
        return time.strftime("%H:%M:%S", time.localtime(v))
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)
