"""The house rules the layout keeps, checked from outside by reading the code: no import circle, the
library never imports the service or the daemon, one module per idea, thin servicers, one place each
for atomic writes and the message limit, and the paths users' scripts name still import."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "colaflow", "server": "colaflow.server", "edge_client": "colaflow.edge_client"}


def _modules() -> dict[str, Path]:
    """Every hand-written module, by the name pyproject maps it to (runtime/v1 is generated)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[0] == "v1":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its body (function-level too), except under
    `if TYPE_CHECKING:`; `from pkg import x` counts as pkg.x where that is a module."""
    tree = ast.parse(path.read_text())
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def nearest(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id",
                                                     getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import):
                found.update(m for a in child.names if (m := nearest(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = here
                for _ in range(max(child.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{child.module}" if child.module else base) if child.level else (child.module or "")
                for a in child.names:
                    m = nearest(f"{mod}.{a.name}") if f"{mod}.{a.name}" in known else nearest(mod)
                    if m:
                        found.add(m)
            visit(child)
    visit(tree)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_circle():
    """No module reaches itself through imports, function-level ones included (a package `__init__`
    that fills its own registry from its own modules is allowed: they never import it back)."""
    graph = _graph()
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))
    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            connect(v)
    assert not circles, circles


def test_the_library_never_imports_the_service_or_the_daemon():
    """Not in any module of runtime/ (CLI and benches included): a command or bench that needs the
    service lives with it, and the CLI names it. Checked by reading, and by importing every module."""
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.startswith(("colaflow.server", "colaflow.edge_client")))
           for m, deps in graph.items() if not m.startswith(("colaflow.server", "colaflow.edge_client"))}
    assert not {m: d for m, d in bad.items() if d}
    for m, deps in graph.items():
        if m.startswith("colaflow.server"):
            assert not any(d.startswith("colaflow.edge_client") for d in deps), m
        if m.startswith("colaflow.edge_client"):
            assert not any(d.startswith("colaflow.server") for d in deps), m
    library = sorted(m for m in graph if not m.startswith(("colaflow.server", "colaflow.edge_client")))
    code = ("import importlib, sys\n"
            f"for m in {library!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ImportError as e:\n"
            "        if 'ray' not in str(e).lower(): raise\n"  # colaflow.ray without Ray installed
            "print(sorted(m for m in sys.modules if m.startswith(('colaflow.server', 'colaflow.edge_client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_modules_of_one_idea_and_a_tree_that_shows_the_parts():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert not {m: n for m, n in sizes.items() if n > 500}
    flat = sorted(p.name for p in (ROOT / "runtime").glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= 20, flat
    kinds = {p.stem for p in (ROOT / "runtime" / "adapters").glob("*.py")}
    assert {"base", "lowrank", "linear", "mlp", "houlsby", "adalink", "coda", "smalllm", "head"} <= kinds
    from colaflow.adapters import adapter_kinds  # the package's __init__ fills the registry

    assert {"lowrank", "linear", "mlp", "houlsby", "adalink", "coda", "smalllm", "with_head"} <= set(adapter_kinds())


def _used(path: Path, owner: str) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == owner}


def test_servicers_are_thin_and_never_write_state():
    """Every use the servicers make of the coordinator and the scheduler is a call of their public
    methods (the scheduler locks itself); none reads or writes a record."""
    from colaflow.control.scheduler import Scheduler
    from colaflow.server.coordinator import Coordinator

    def api(cls) -> set[str]:
        return {n for c in cls.__mro__ for n, v in vars(c).items() if callable(v) and not n.startswith("_")}
    for name in ("worker_service.py", "control_service.py"):
        path = ROOT / "server" / name
        assert _used(path, "scheduler") <= api(Scheduler), (name, _used(path, "scheduler") - api(Scheduler))
        # the coordinator: its API, `stopping`, and its host's limits and model (GetTokenizer, PEFT export)
        assert _used(path, "coordinator") <= api(Coordinator) | {"stopping", "host"}, name


def test_one_place_each_for_atomic_writes_backoff_and_the_message_limit():
    sources = {p: p.read_text() for d in PACKAGES for p in (ROOT / d).rglob("*.py") if "/v1/" not in str(p)}
    assert [p.name for p, s in sources.items() if "os.replace(" in s] == ["files.py"]
    assert [p.name for p, s in sources.items() if "64 << 20" in s] == ["channel.py"]
    assert [p.name for p, s in sources.items() if "2 **" in s and "min(" in s] == ["checks.py"]
    assert [p.name for p, s in sources.items() if 'ENDED = ("done"' in s] == ["status.py"]


@pytest.mark.parametrize("path", ["colaflow.models", "colaflow.export", "colaflow.client", "colaflow.data",
                                  "colaflow.datasets", "colaflow.loss", "colaflow.evaluate", "colaflow.plot",
                                  "colaflow.local", "colaflow.maps", "colaflow.v1", "colaflow.cli.serve"])
def test_the_paths_users_scripts_name_still_import(path):
    module = importlib.import_module(path)
    names = {"colaflow.client": ["Client", "JobInfo"], "colaflow.data": ["to_map", "from_map", "collate"],
             "colaflow.datasets": ["rows"], "colaflow.loss": ["IGNORE", "causal_lm", "seq_cls"],
             "colaflow.evaluate": ["EvalSet", "eval_map"], "colaflow.plot": ["write_png"],
             "colaflow.export": ["save_peft", "save", "load", "attached"], "colaflow.cli.serve": ["add_parser", "run"]}
    for name in names.get(path, []):
        assert getattr(module, name) is not None


def test_public_names_and_submodules_load_on_first_use():
    code = ("import colaflow, sys; assert 'torch' not in sys.modules;"
            "colaflow.plot.write_png; colaflow.LowRank; colaflow.Session; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
