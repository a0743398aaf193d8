"""Shared fixtures: tiny models, random batches, and PEFT LoRA as the exactness reference."""
from __future__ import annotations

import copy

import pytest
import torch

from colaflow.data.batches import IGNORE
from colaflow.engine.loss import causal_lm

torch.set_num_threads(2)


def random_batch(vocab: int, rows: int, length: int, seed: int, ragged: bool = True) -> dict:
    """Token batch with right padding (ragged lengths) and labels -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    lens = torch.randint(length // 2, length + 1, (rows,), generator=g) if ragged else torch.full((rows,), length)
    mask = (torch.arange(length)[None] < lens[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_stream(vocab: int, rows: int, length: int, seed: int, steps: int) -> list[dict]:
    return [random_batch(vocab, rows, length, seed * 1000 + i) for i in range(steps)]


class PeftReference:
    """PEFT LoRA trained by ordinary backprop on a copy of the same model, from the same start."""

    def __init__(self, model, trainer, job_id: str, spec, make_opt):
        from peft import LoraConfig, get_peft_model

        sites = list(trainer.adapters(job_id))
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=sites,
                         init_lora_weights=True)
        self.model = get_peft_model(copy.deepcopy(model), cfg)
        inner = self.model.base_model.model
        self.layers = {s: inner.get_submodule(s) for s in sites}
        with torch.no_grad():
            for s, a in trainer.adapters(job_id).items():  # same A (random) and B (zero) as colaflow
                self.layers[s].lora_A["default"].weight.copy_(a.A)
                self.layers[s].lora_B["default"].weight.copy_(a.B)
        self.opt = make_opt([p for p in self.model.parameters() if p.requires_grad])

    def step(self, batches: list[dict]) -> None:
        """One optimizer step on the summed loss of `batches` (gradient accumulation when > 1)."""
        self.opt.zero_grad()
        for b in batches:
            out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            rs, rc = causal_lm(out, b)
            (rs.sum() / rc.sum()).backward()
        self.opt.step()

    def params(self, site: str) -> dict[str, torch.Tensor]:
        layer = self.layers[site]
        return {"A": layer.lora_A["default"].weight.detach(), "B": layer.lora_B["default"].weight.detach()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def peft_reference():
    return PeftReference
