"""Generate colaflow's gRPC code from proto/colaflow/v1/*.proto into runtime/v1/ (colaflow.v1).

    python proto/generate.py           # regenerate (also: make proto)
    python proto/generate.py --check   # exit 1 if the committed code is stale
"""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "runtime" / "v1"
HEADER = '"""colaflow.v1: code generated from proto/colaflow/v1 by proto/generate.py. Never edit."""\n'


def generate(dest: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "colaflow" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *sources]
        subprocess.run(cmd, check=True, cwd=PROTO)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / "colaflow" / "v1").iterdir()):
            shutil.copy(f, dest / f.name)
    (dest / "__init__.py").write_text(HEADER)


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            names = sorted(p.name for p in Path(tmp).iterdir())
            have = sorted(p.name for p in OUT.iterdir() if p.suffix in (".py", ".pyi")) if OUT.exists() else []
            _, mismatch, errors = filecmp.cmpfiles(tmp, OUT, names, shallow=False)
            if mismatch or errors or names != have:
                print(f"generated code in {OUT} is stale: {sorted(mismatch + errors) or 'file list differs'}; "
                      "run: python proto/generate.py", file=sys.stderr)
                return 1
        print("generated code is up to date")
        return 0
    generate(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
