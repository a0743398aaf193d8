"""The layout promised to users: a non-editable install imports all three packages; the CLI runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_imports(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("colaflow-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import colaflow, colaflow.server, colaflow.edge_client, colaflow.cli.main, colaflow.bench.tenants;"
            "print(colaflow.__file__); print(colaflow.server.__file__); print(colaflow.edge_client.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out
    assert out[1].endswith("colaflow/server/__init__.py") and out[2].endswith("colaflow/edge_client/__init__.py")
    assert (target / "colaflow" / "server" / "status.html").is_file()  # the status page ships as package data


def test_console_script_help():
    out = subprocess.run([str(Path(sys.executable).parent / "colaflow"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" in out.stdout
    bad = subprocess.run([str(Path(sys.executable).parent / "colaflow"), "bench", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_license_is_an_spdx_expression_setuptools_reads_without_warning():
    """`project.license` as a table is deprecated (setuptools stops building it after 2027-02-18)."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message) for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"
