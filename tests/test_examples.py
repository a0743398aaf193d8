"""The examples run as documented."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_examples_run(tmp_path):
    for name, expect in (("quickstart.py", "acme's PEFT adapter"), ("service.py", "done ->")):
        out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert expect in out.stdout
    assert (tmp_path / "colaflow-out/acme-lora/adapter_config.json").exists()
    assert (tmp_path / "colaflow-out/service-demo/adapter.json").exists()
