"""Invariant 1: ColA with a low-rank adapter, fp32, I=1, S=0 follows PEFT LoRA's trajectory."""
from __future__ import annotations

import pytest
import torch

from colaflow import SGD, AdamW, JobSpec, LowRank, Trainer
from colaflow.models import tiny
from conftest import batch_stream, rel_err

TOL = 1e-5


def _run(family, targets, opt_spec, make_opt, peft_reference, interval=1, steps=20, merge=False):
    model = tiny(family)
    spec = LowRank(r=8, alpha=16)
    trainer = Trainer(model, [JobSpec("j", spec, opt_spec, target_modules=targets, fit_interval=interval,
                                      merge=merge)])
    ref = peft_reference(model, trainer, "j", spec, make_opt)
    data = batch_stream(96, 4, 12, seed=1, steps=steps * interval)
    for i in range(steps):
        chunk = data[i * interval:(i + 1) * interval]
        for b in chunk:
            trainer.step({"j": b})
        ref.step(chunk)
    trainer.flush()
    errs = []
    for site, adapter in trainer.adapters("j").items():
        want = ref.params(site)
        assert want["B"].abs().max() > 0, "the reference did not train"
        errs += [rel_err(adapter.A.detach(), want["A"]), rel_err(adapter.B.detach(), want["B"])]
        # the server's copy must equal the device's after the last update
        host_copy = trainer.host.jobs["j"].adapters[site]
        assert torch.equal(host_copy.B, adapter.B.detach())
    return max(errs), len(trainer.adapters("j"))


@pytest.mark.parametrize("merge", [True, False])
def test_llama_adamw_equals_peft(peft_reference, merge):
    err, n = _run("llama", ["q_proj", "v_proj"], AdamW(lr=1e-2),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), peft_reference, merge=merge)
    assert n == 4
    assert err <= TOL, err


def test_llama_sgd_momentum_equals_peft(peft_reference):
    err, _ = _run("llama", ["q_proj", "v_proj"], SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                  peft_reference)
    assert err <= TOL, err


def test_fit_interval_equals_gradient_accumulation(peft_reference):
    err, _ = _run("llama", ["q_proj", "v_proj"], AdamW(lr=1e-2, weight_decay=0.1),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), peft_reference,
                  interval=4, steps=8)
    assert err <= TOL, err


def test_gpt2_conv1d_equals_peft(peft_reference):
    err, n = _run("gpt2", ["c_attn"], AdamW(lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), peft_reference)
    assert n == 2
    assert err <= TOL, err


def test_trajectory_differs_when_wrong(peft_reference):
    """The comparison can fail: a different learning rate is far outside the tolerance."""
    err, _ = _run("llama", ["q_proj", "v_proj"], AdamW(lr=1.1e-2),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), peft_reference, steps=5)
    assert err > 100 * TOL
