"""Invariant 1: ColA with a low-rank adapter, fp32, I=1, S=0 follows PEFT LoRA's trajectory."""
from __future__ import annotations

import pytest
import torch
from conftest import batch_stream, rel_err

from colaflow import SGD, AdamW, JobSpec, LowRank, Trainer
from colaflow.models import tiny

TOL = 1e-5


def _run(family, targets, opt_spec, make_opt, peft_reference, interval=1, steps=20, merge=False, packets="full"):
    model = tiny(family)
    spec = LowRank(r=8, alpha=16)
    trainer = Trainer(model, [JobSpec("j", spec, opt_spec, target_modules=targets, fit_interval=interval,
                                      merge=merge, packets=packets)])
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
    err, n = _run("gpt2", ["c_attn"], AdamW(lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
                  peft_reference)
    assert n == 2
    assert err <= TOL, err


@pytest.mark.parametrize("family,targets,interval", [("llama", ["q_proj", "v_proj"], 1),
                                                     ("llama", ["q_proj", "v_proj"], 2),
                                                     ("gpt2", ["c_attn"], 1), ("gpt2", ["c_attn"], 3)])
def test_projected_packets_equal_peft(peft_reference, family, targets, interval):
    """The server sends each site's (G B)^T X and G^T (X A^T) instead of X and G: PEFT's trajectory still."""
    err, _ = _run(family, targets, AdamW(lr=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
                  peft_reference, interval=interval, steps=8, packets="projected")
    assert err <= TOL, err


def test_trajectory_differs_when_wrong(peft_reference):
    """The comparison can fail: a different learning rate is far outside the tolerance."""
    err, _ = _run("llama", ["q_proj", "v_proj"], AdamW(lr=1.1e-2),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), peft_reference, steps=5)
    assert err > 100 * TOL


def _seq2seq(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg).eval(), ["q", "v"], 0
    cfg = tf.BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(cfg).eval(), ["q_proj", "v_proj"], 1


def _seq2seq_batch(model, pad: int, t_enc: int, t_dec: int, seed: int) -> dict:
    """Encoder rows padded on the left or the right, decoder rows padded on the right."""
    from colaflow.data.batches import IGNORE

    g = torch.Generator().manual_seed(seed)
    rows = 3
    ids = torch.randint(3, 96, (rows, t_enc), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        n = int(torch.randint(t_enc // 2, t_enc + 1, (1,), generator=g))
        if r % 2:  # left padding
            mask[r, : t_enc - n] = 0
        else:
            mask[r, n:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    labels = torch.randint(3, 96, (rows, t_dec), generator=g)
    for r in range(rows):
        labels[r, int(torch.randint(t_dec // 2, t_dec + 1, (1,), generator=g)):] = IGNORE
    dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": (labels != IGNORE).long(), "labels": labels}


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("t_enc,t_dec,packets", [(10, 10, "full"), (12, 7, "full"), (12, 7, "projected")])
def test_encoder_decoder_equals_peft(family, t_enc, t_dec, packets):
    """Decoder and cross-attention sites keep their own real tokens, equal lengths or not."""
    import copy

    from peft import LoraConfig, get_peft_model

    from colaflow.engine.loss import token_cls

    model, targets, pad = _seq2seq(family)
    spec = LowRank(r=4, alpha=8)
    trainer = Trainer(model, [JobSpec("j", spec, AdamW(lr=1e-2), target_modules=targets, packets=packets)],
                      loss_fn=token_cls)
    sites = list(trainer.adapters("j"))
    assert any("decoder" in s and ("EncDec" in s or "encoder_attn" in s) for s in sites)  # cross-attention too
    ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=sites))
    layers = {s: ref.base_model.model.get_submodule(s) for s in sites}
    with torch.no_grad():
        for s, a in trainer.adapters("j").items():
            layers[s].lora_A["default"].weight.copy_(a.A)
            layers[s].lora_B["default"].weight.copy_(a.B)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(6):
        batch = _seq2seq_batch(model, pad, t_enc, t_dec, seed=step)
        trainer.step({"j": batch})
        opt.zero_grad()
        rs, rc = token_cls(ref(**{k: v for k, v in batch.items() if k != "labels"}), batch)
        (rs.sum() / rc.sum()).backward()
        opt.step()
    errs = [rel_err(getattr(a, n).detach(), layers[s].__getattr__(f"lora_{n}")["default"].weight.detach())
            for s, a in trainer.adapters("j").items() for n in ("A", "B")]
    assert max(errs) <= TOL, max(errs)
