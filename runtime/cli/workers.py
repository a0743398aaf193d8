"""`colaflow workers`: every worker the server knows (admin token): state, sites, fits/s, traffic."""
from __future__ import annotations

import argparse
import json

from ._control import add_common, client, out, table


def add_parser(sub) -> None:
    p = sub.add_parser("workers", help="list workers (admin)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        view = c.workers()
    finally:
        c.close()
    if args.json:
        out(json.dumps(view, indent=2))
    elif not view:
        out("no workers")
    else:
        out(table([[w["worker"], w["state"], _ago(w["last_seen_s"]),
                    " ".join(f"{j}:{len(s)}" for j, s in w["sites"].items()) or "-",
                    f"{w['fits_per_s']:.1f}", _bytes(w["bytes_in"]), _bytes(w["bytes_out"])] for w in view],
                  ["WORKER", "STATE", "LAST SEEN", "SITES (JOB:N)", "FITS/S", "IN", "OUT"]))
    return 0


def _ago(s) -> str:
    return "-" if s is None else f"{s:.0f}s ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
