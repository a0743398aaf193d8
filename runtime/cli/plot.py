"""`colaflow plot JOB [-o FILE]`: a PNG of a job's loss and eval curves (colaflow.plot)."""
from __future__ import annotations

import argparse

from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="write a PNG of a job's loss and eval curves")
    p.add_argument("job")
    p.add_argument("-o", "--out", help="the PNG to write (default: JOB.png)")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    from colaflow.studies.plot import write_png

    c = client(args)
    try:
        metrics = c.metrics_so_far(args.job)
    finally:
        c.close()
    path = write_png(metrics, args.out or f"{args.job}.png", title=args.job)
    out(f"wrote {path} ({len(metrics)} steps)")
    return 0
