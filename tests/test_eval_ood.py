"""`colaflow eval --ood` end to end on the real all-MiniLM-L6-v2 (a few steps: the wiring, not the figures)."""
from __future__ import annotations

import json

import pytest

from colaflow.models import packaged_dir


def _minilm() -> None:
    try:
        packaged_dir("minilm-l6")
    except RuntimeError as e:  # `make venv` installs it; a hand-made venv may not have it
        pytest.skip(str(e))


def test_eval_ood_prints_the_table_and_a_json_line(capsys):
    from colaflow.cli.main import main

    _minilm()
    assert main(["eval", "--ood", "--kinds", "lora,nosuchkind", "--steps", "3", "--batch-size", "8"]) == 0
    out, err = capsys.readouterr()
    assert "skipping adapter kind 'nosuchkind'" in err  # kinds that arrive by merge are skipped, not fatal
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["base", "lowrank"]  # `lora` is lowrank's alias
    assert any(line.startswith("base ") for line in lines) and any(line.startswith("lowrank ") for line in lines)
    assert rows["base"]["trainable"] == 384 * 12 + 12  # the probe: the head's dW and bias only
    assert rows["lowrank"]["trainable"] > rows["base"]["trainable"]
    for r in rows.values():
        for metric in ("auroc", "fpr95"):
            assert set(r[metric]) == {"msp", "energy", "mahalanobis"}
            assert all(0.0 <= v <= 1.0 for v in r[metric].values())
    # Mahalanobis on the frozen body's features needs no training: held-out intents (weather,
    # translation, jokes) lie far from the banking/travel/etc. classes in MiniLM's sentence space
    assert rows["base"]["auroc"]["mahalanobis"] > 0.8, rows["base"]
