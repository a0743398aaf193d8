"""`colaflow bench NAME`: benchmarks that print both sides and their ratios as JSON on the last line.

A bench of the service itself lives with it (`colaflow.server.bench_wire`): named here, never imported
by the library."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {"server-step": "colaflow.bench.server_step", "tenants": "colaflow.bench.tenants",
           "wire": "colaflow.server.bench_wire", "state": "colaflow.bench.state", "e2e": "colaflow.bench.e2e",
           "load": "colaflow.bench.load", "chaos": "colaflow.bench.chaos", "link": "colaflow.bench.link",
           "coda": "colaflow.bench.coda", "blackbox": "colaflow.bench.blackbox",
           "scale": "colaflow.bench.scale"}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES))
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per side")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="worker counts, comma-separated (e2e: daemons over gRPC, default 1,2,4; "
                        "load: default 8,16,64,256)")
    p.add_argument("--seconds", type=float, default=15.0, help="load: measured seconds per worker count")
    p.add_argument("--codecs", type=lambda s: s.split(","), default=None,
                   help="link: codecs to compare, comma-separated (default: all)")
    p.add_argument("--mbit", type=float, default=0.0,
                   help="wire: also move each codec's frames through a link shaped to this many Mbit/s, 20 ms RTT")
    p.add_argument("--server-threads", type=int, default=2, help="link: torch threads of the server")
    p.add_argument("--shape", default=None, help="scale: model shapes, comma-separated (0.5b, 1b, 3b, llama-3-8b, "
                   "llama-3-70b, or an HF config.json; default 0.5b,1b); link: the byte model of one shape")
    p.add_argument("--quick", action="store_true", help="link: raw and projected packets only (~15 min on 2 cores)")
    p.add_argument("--rows", type=int, default=None, help="scale: rows per batch (default 4); link --shape: 8")
    p.add_argument("--tokens", type=int, default=None, help="scale: tokens per row (default 128); link --shape: 2048")
    p.add_argument("--steps", type=int, default=None, help="link, coda: steps of each full run (default 60); "
                   "blackbox: steps of each quality run (default 60)")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.name]).main(args)
