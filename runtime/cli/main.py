"""The `colaflow` console command; each subcommand lives in its own module.

Operator commands (submit, jobs, status, logs, cancel, workers, export, plot) exit 0 on success, 1 on an
error (one line `colaflow: error: ...`; --debug adds the traceback) and 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys

from . import bench, cancel, demo, edge, export, jobs, logs, plot, serve, status, submit, workers
from . import eval as eval_  # `colaflow eval --ood`
from ._control import UsageError, err, explain

COMMANDS = {"demo": demo, "bench": bench, "serve": serve, "edge": edge, "submit": submit, "jobs": jobs,
            "status": status, "logs": logs, "cancel": cancel, "workers": workers, "export": export,
            "plot": plot, "eval": eval_}
OPERATOR = {"submit", "jobs", "status", "logs", "cancel", "workers", "export", "plot"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colaflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except KeyboardInterrupt:
        print("colaflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.command not in OPERATOR or args.debug:
            raise
        err(f"colaflow: error: {explain(e, args)}")
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
