"""`colaflow submit job.yaml`: submit a job described by a YAML file (see colaflow.data.jobfile)."""
from __future__ import annotations

import argparse

from ._control import add_common, err, out, session


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a job from a YAML file")
    p.add_argument("file", help="the job file (keys: steps, data, adapter, optimizer, targets, ...)")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    from colaflow.data.jobfile import load_job

    kwargs = load_job(args.file)
    with session(args) as s:
        job = s.submit(**kwargs)
    out(job.id)
    err(f"submitted job {job.id} ({job.steps} steps); follow it: colaflow logs {job.id} --follow")
    return 0

