"""`colaflow bench NAME`: benchmarks that print both sides and their ratios as JSON on the last line."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {"server-step": "colaflow.bench.server_step", "tenants": "colaflow.bench.tenants",
           "wire": "colaflow.bench.wire", "state": "colaflow.bench.state", "e2e": "colaflow.bench.e2e"}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES))
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per side")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                   help="e2e: the edge daemon counts to run over gRPC (comma-separated)")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.name]).main(args)
