"""The `colaflow` console command; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import sys

from . import bench, demo, edge, serve
from . import eval as eval_  # `colaflow eval --ood`

COMMANDS = {"demo": demo, "bench": bench, "serve": serve, "edge": edge}
COMMANDS["eval"] = eval_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colaflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except KeyboardInterrupt:
        print("colaflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
