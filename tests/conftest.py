"""Shared fixtures: tiny models, random batches, and PEFT LoRA as the exactness reference."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from colaflow.data.batches import IGNORE
from colaflow.engine.loss import causal_lm

# `make test` runs two pytest-xdist workers on CI's two cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The files that start whole clusters (a local Ray, `ray up` over ssh, the SmolLM2 demo's server and
# daemons) run first and one after another, on one worker: they overlap only with the short tests on
# the other, never with each other (Ray's default ports, two heavy trainings on two cores).
SERIAL = ("test_ray_up.py", "test_ray.py", "test_smollm2.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: Path(str(item.fspath)).name not in SERIAL)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """A file at a time, as `--dist loadfile`, but the SERIAL files are one unit, sent first."""
    from xdist.scheduler import LoadScopeScheduling

    class Files(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "serial" if Path(path).name in SERIAL else path

    config.option.loadscopereorder = False  # (it would send the files with most tests first)
    return Files(config, log)


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
