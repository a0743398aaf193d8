"""`colaflow export JOB DIR [--format peft|native] [--which last|best]`: download a job's adapters.

peft: a LoRA directory stock PEFT loads (`PeftModel.from_pretrained(base, DIR)`); native: any adapter
kind, and what `init: DIR` continues a job from.
"""
from __future__ import annotations

import argparse

from ._control import add_common, client, out


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="download a job's adapters (PEFT LoRA or native)")
    p.add_argument("job")
    p.add_argument("dir",
                   help="a new directory, or an earlier export of the same format (replaced whole); a directory "
                        "holding anything else is refused, and a failed export leaves it as it was")
    p.add_argument("--format", choices=["peft", "native"], default="peft")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="the newest adapters, or those of the best eval step")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        path = c.export(args.job, args.dir, format=args.format, which=args.which)
    finally:
        c.close()
    out(f"exported job {args.job} ({args.format}, {args.which}) to {path}")
    return 0
