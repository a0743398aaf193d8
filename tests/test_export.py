"""Export: a PEFT LoRA directory that stock PEFT loads with equal outputs; the native round trip."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import batch_stream, random_batch

from colaflow import MLP, AdamW, JobSpec, Linear, LowRank, Trainer
from colaflow.export import load, save, save_peft
from colaflow.models import tiny


def _trained(family, spec, targets=None, steps=4):
    model = tiny(family)
    job = JobSpec("a", spec, AdamW(lr=3e-2), target_modules=targets)
    trainer = Trainer(model, [job])
    for b in batch_stream(96, 2, 8, seed=4, steps=steps):
        trainer.step({"a": b})
    trainer.flush()
    return model, trainer, job


@pytest.mark.parametrize("family,targets", [("llama", None), ("gpt2", None), ("llama", ["embed_tokens", "o_proj"])])
def test_peft_export_loads_in_peft_with_equal_outputs(tmp_path, family, targets):
    from peft import PeftModel

    model, trainer, _ = _trained(family, LowRank(r=4, alpha=8), targets)
    path = save_peft(trainer.adapters("a"), tmp_path / "peft", base_model=f"tiny-{family}", model=model)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    batch = random_batch(96, 2, 8, 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with trainer.host.using("a"):
            ours = model(**inputs).logits
        plain = model(**inputs).logits
        peft_model = PeftModel.from_pretrained(model, str(path))
        theirs = peft_model(**inputs).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapters do something
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", [LowRank(r=2), Linear(bias=True), MLP(hidden=8)])
def test_native_round_trip(tmp_path, spec):
    _, trainer, job = _trained("gpt2", spec)
    save(trainer.adapters("a"), job, tmp_path / "native")
    spec2, adapters = load(tmp_path / "native")
    assert spec2 == job
    for site, a in trainer.adapters("a").items():
        for (n, p), q in zip(a.named_parameters(), adapters[site].parameters()):
            assert torch.equal(p.detach(), q.detach()), (site, n)


def test_peft_export_refuses_other_kinds(tmp_path):
    _, trainer, _ = _trained("llama", MLP(hidden=4), steps=1)
    with pytest.raises(ValueError, match="PEFT export needs lowrank"):
        save_peft(trainer.adapters("a"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    _, trainer, job = _trained("llama", LowRank(r=2), steps=1)
    path = save(trainer.adapters("a"), job, tmp_path / "native")
    before = (path / "adapter.safetensors").read_bytes()
    import colaflow.export as ex

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ex, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save(trainer.adapters("a"), job, path)
    assert (path / "adapter.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["native"]


def test_export_replaces_only_an_earlier_export_and_never_deletes_other_files(tmp_path, monkeypatch):
    """An export replaces a directory whose every entry it writes again; anything else there is
    refused before a byte is lost (a user's `export JOB .` once deleted their working directory)."""
    import os
    import stat

    _, trainer, job = _trained("llama", LowRank(r=2), steps=1)
    work, mine = tmp_path / "work", tmp_path / "mine"
    work.mkdir()
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "sub").mkdir()
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    (work / "sub").mkdir()
    with pytest.raises(FileExistsError, match="current directory"):
        save(trainer.adapters("a"), job, ".")
    with pytest.raises(FileExistsError, match="is a file"):
        save(trainer.adapters("a"), job, "notes.txt")
    with pytest.raises(FileExistsError, match="notes.txt, sub, which this write would delete"):
        save_peft(trainer.adapters("a"), mine)
    assert sorted(os.listdir(mine)) == ["notes.txt", "sub"] and (mine / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["mine", "work"]  # no temp dir left behind
    path = save(trainer.adapters("a"), job, "out")  # new: made; again: replaced
    os.utime(path / "adapter.json", (0, 0))
    save(trainer.adapters("a"), job, "out")
    assert (path / "adapter.json").stat().st_mtime > 0 and sorted(os.listdir(work)) == ["notes.txt", "out", "sub"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~_umask()  # as mkdir makes it, not mkdtemp's 0700
    # another format: not the same thing
    with pytest.raises(FileExistsError, match="adapter.json, adapter.safetensors"):
        save_peft(trainer.adapters("a"), "out")
    assert load("out")[1].keys() == trainer.adapters("a").keys()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_peft_export_of_a_classifier_and_a_seq2seq_model_says_what_peft_expects(tmp_path):
    """A BertForSequenceClassification adapter loads in stock PEFT: by default with no task type (onto
    the same base, head included), and with task_type="SEQ_CLS" as PEFT's classifier loader wants it,
    the head's weights in modules_to_save; T5 says SEQ_2_SEQ_LM, Llama CAUSAL_LM."""
    from peft import PeftModel

    from colaflow.engine.loss import seq_cls
    from colaflow.export import peft_task_type

    model = tiny("bert")
    trainer = Trainer(model, [JobSpec("a", LowRank(r=4), AdamW(lr=3e-2))], loss_fn=seq_cls)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(1, 96, (4, 8), generator=g)
        trainer.step({"a": {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                            "labels": torch.randint(0, 3, (4,), generator=g)}})
    trainer.flush()
    path = save_peft(trainer.adapters("a"), tmp_path / "bert", model=model)
    assert json.loads((path / "adapter_config.json").read_text())["task_type"] is None
    other = copy.deepcopy(model)  # before PEFT wraps `model`'s modules in place
    ids = torch.randint(1, 96, (2, 8), generator=g)
    with torch.no_grad():
        with trainer.host.using("a"):
            ours = model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(model, str(path))(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # SEQ_CLS, as PEFT's sequence-classification loader wants it: the head's weights in modules_to_save.
    # Onto a base whose head was re-drawn, the export brings the head back: the same logits
    seq_cls_dir = save_peft(trainer.adapters("a"), tmp_path / "bert-seq-cls", model=model, task_type="SEQ_CLS")
    config = json.loads((seq_cls_dir / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    with torch.no_grad():
        other.classifier.weight.normal_()
        other.classifier.bias.normal_()
        loaded = PeftModel.from_pretrained(other, str(seq_cls_dir))
        assert type(loaded).__name__ == "PeftModelForSequenceClassification"
        assert torch.allclose(loaded(input_ids=ids).logits, ours, atol=1e-5)
    with pytest.raises(ValueError, match="pass `model=`"):
        save_peft(trainer.adapters("a"), tmp_path / "no-model", task_type="SEQ_CLS")
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                   num_heads=2))
    assert (peft_task_type(t5), peft_task_type(tiny("llama")), peft_task_type(tiny("gpt2"))) == \
        ("SEQ_2_SEQ_LM", "CAUSAL_LM", "CAUSAL_LM")
