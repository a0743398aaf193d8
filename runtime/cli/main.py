"""The `colaflow` console command; each subcommand lives in its own module.

Every command exits 0 on success, 1 on an error (one line `colaflow: error: ...`; --debug adds the
traceback) and 2 on a usage error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ._control import UsageError, err, explain

# each command's module: `add_parser(sub)` and `run(args)`. A command that needs the service or the
# daemon lives with it (the library never imports colaflow.server or colaflow.edge_client); all
# of them load when the parser is built, which imports no torch.
COMMANDS = {"demo": "colaflow.cli.demo", "bench": "colaflow.cli.bench", "serve": "colaflow.server.cli",
            "edge": "colaflow.edge_client.cli", "submit": "colaflow.cli.submit", "jobs": "colaflow.cli.jobs",
            "status": "colaflow.cli.status", "logs": "colaflow.cli.logs", "cancel": "colaflow.cli.cancel",
            "delete": "colaflow.cli.delete",
            "workers": "colaflow.cli.workers", "export": "colaflow.cli.export", "plot": "colaflow.cli.plot",
            "eval": "colaflow.cli.eval"}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, where it has one that its help does not already name."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colaflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for name, module in modules.items():
        module.add_parser(sub)
        p = sub.choices[name]
        p.formatter_class = _Help
        if not any("--debug" in a.option_strings for a in p._actions):
            p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except KeyboardInterrupt:
        print("colaflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `colaflow logs JOB | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        err(f"colaflow: error: {explain(e, args)}")
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
