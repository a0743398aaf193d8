"""The real pretrained model: SmolLM2-135M loads offline, ColA equals PEFT on it, the demo learns."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from colaflow import AdamW, JobSpec, LowRank, Trainer
from colaflow.data import batches
from colaflow.models import load
from colaflow.studies.tasks.knowledge import make_facts, train_examples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


def test_loads_offline(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) > 130e6
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    # pretrained weights, not random ones: a random model scores about ln(49152) = 10.8 nats
    assert loss < 4.0, float(loss)


def test_colaflow_equals_peft_on_smollm2(smollm2, peft_reference):
    model, tok = smollm2
    spec = LowRank(r=8, alpha=16)
    trainer = Trainer(model, [JobSpec("j", spec, AdamW(lr=1e-3), target_modules=[
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
        "model.layers.20.self_attn.q_proj", "model.layers.20.self_attn.v_proj"])])
    ref = peft_reference(model, trainer, "j", spec, lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0))
    data = batches(train_examples(tok, make_facts(6)), 4)
    for _ in range(3):
        b = next(data)
        trainer.step({"j": b})
        ref.step([b])
    trainer.flush()
    for site, a in trainer.adapters("j").items():
        assert rel_err(a.B.detach(), ref.params(site)["B"]) <= 1e-5
        assert rel_err(a.A.detach(), ref.params(site)["A"]) <= 1e-5
    for p in model.parameters():
        p.requires_grad_(False)


def test_demo_runs_and_exports(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "colaflow"), "demo", "--facts", "6", "--steps", "40",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "exact match before fine-tuning: 0.0%" in text
    after = float(text.split("exact match after fine-tuning:")[1].split("%")[0])
    assert after >= 50.0, text
    assert (tmp_path / "out/peft/adapter_model.safetensors").exists()
    assert (tmp_path / "out/native/adapter.json").exists()
    # held-out exact match as an eval metric while it trains (steps 0, 25 and the last), and its curves
    reported = [float(line.split("eval_exact_match")[1].split("%")[0]) for line in text.splitlines()
                if "eval_exact_match" in line]
    assert len(reported) == 3 and reported[0] == 0.0 and reported[-1] > 0.0, text
    assert (tmp_path / "out/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
