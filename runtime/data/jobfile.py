"""Job files: a fine-tuning job as YAML, the same file from the CLI and from Python.

    # job.yaml
    id: acme-support
    steps: 200
    batch_size: 8
    targets: [q_proj, v_proj]
    adapter: {kind: lowrank, r: 8, alpha: 16}
    optimizer: {kind: adamw, lr: 3.0e-4, schedule: {kind: linear, warmup: 20, total: 200}}
    data: train.jsonl            # a path, relative to this file; or an inline list of rows
    init: exports/acme-native    # optional: continue from a native export (relative to this file)

    colaflow submit job.yaml                                   # the CLI
    session.submit(**colaflow.load_job("job.yaml"))            # Python: the same keyword arguments

Top-level keys are `Session.submit`'s keyword arguments, so an option added there works here with
no change; `data` is its `examples`, `id` is `job_id`, and `adapter` / `optimizer` maps go through
`AdapterSpec.from_dict` / `OptimizerSpec.from_dict` (their `kind` picks the registered class).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from ..adapters.base import AdapterSpec
from ..errors import InvalidArgument
from ..learn.optim import OptimizerSpec

ALIASES = {"data": "examples", "id": "job_id"}
PATHS = ("examples", "init", "eval_data", "eval_prompts")  # relative to the job file


def known_keys() -> list[str]:
    """The keys a job file may have: `Session.submit`'s keyword arguments, `data` and `id`."""
    from ..session import Session

    params = [p for p in inspect.signature(Session.submit).parameters if p not in ("self", "examples")]
    return sorted([*params, *ALIASES])


def load_job(path: str | os.PathLike) -> dict:
    """The `Session.submit` keyword arguments a YAML job file describes (specs built, paths resolved)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.load(path.read_text(), _loader())
    except OSError as e:
        raise InvalidArgument(f"cannot read job file {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return job_kwargs(doc, path.parent, str(path))


def _loader():
    """PyYAML's safe loader, reading `1e-3` as the float YAML 1.2 says it is (1.1: a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def job_kwargs(doc, base: Path, where: str = "job") -> dict:
    """`load_job` on an already parsed map: relative paths are taken from `base`."""
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: a job file is a map of keys (steps, data, adapter, ...), got "
                              f"{type(doc).__name__}")
    known = known_keys()
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(known)}")
    for alias, name in ALIASES.items():
        if alias in doc and name in doc:
            raise InvalidArgument(f"{where}: `{alias}` and `{name}` are the same key; give one")
    out = {ALIASES.get(k, k): v for k, v in doc.items()}
    if "examples" not in out:
        raise InvalidArgument(f"{where}: no `data` (a file of examples, relative to the job file, or a list of rows)")
    if "steps" not in out:
        raise InvalidArgument(f"{where}: no `steps` (how many training steps)")
    try:
        for name, cls in (("adapter", AdapterSpec), ("optimizer", OptimizerSpec)):
            if name in out:
                if not isinstance(out[name], dict):
                    raise ValueError(f"`{name}` must be a map with a `kind`, got {out[name]!r}")
                out[name] = cls.from_dict(out[name])
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{where}: {e}") from None
    for name in PATHS:
        if isinstance(out.get(name), str):
            out[name] = str((base / out[name]).resolve()) if not os.path.isabs(out[name]) else out[name]
    return out
