"""`colaflow.cli.serve`: the name scripts written before the package layout use for `colaflow serve`'s
module. The command lives with the service, in `colaflow.server.cli` (the library never imports the
service); its names load from there on first use."""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("colaflow.server.cli"), name)
