"""Large frozen bases (invariant 11): bf16 and 4-bit weights, activation checkpointing, a model spread
over devices with offload, and checkpoints as users have them — none of them changes the method.

A 4-bit base is checked against PEFT QLoRA on the same quantized weights (bitsandbytes runs NF4 on
the CPU, forward and backward); checkpointing and offload against the same model without them."""
from __future__ import annotations

import pytest
import torch
from conftest import batch_stream, random_batch, rel_err

from colaflow import MLP, AdaLink, AdamW, CoDA, Houlsby, JobSpec, Linear, LowRank, Trainer
from colaflow.engine.host import Host
from colaflow.engine.weights import describe
from colaflow.models import load, tiny

pytest.importorskip("bitsandbytes")
TOL = 1e-4  # the bound for a 4-bit base against PEFT QLoRA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as users have checkpoints (bitsandbytes' 4-bit blocks need widths of 64+)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", hidden=128, layers=2).save_pretrained(path)
    return path


def _qlora_reference(model, trainer: Trainer, spec: LowRank, lr: float):
    """PEFT LoRA on its own copy of the same quantized base, from colaflow's starting A and B."""
    from peft import LoraConfig, get_peft_model

    sites = list(trainer.adapters("j"))
    # in training mode, as QLoRA trains (in eval mode bitsandbytes swaps in a CPU kernel with no backward)
    peft = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=sites)).train()
    layers = {s: peft.base_model.model.get_submodule(s) for s in sites}
    with torch.no_grad():
        for s, a in trainer.adapters("j").items():
            layers[s].lora_A["default"].weight.copy_(a.A)
            layers[s].lora_B["default"].weight.copy_(a.B)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return peft, layers, opt


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_base_follows_peft_qlora(model_dir, quantize):
    """LowRank on the same NF4 (or int8) weights: the trajectory is PEFT QLoRA's to 1e-4."""
    from colaflow.engine.loss import causal_lm

    spec = LowRank(r=4, alpha=8)
    base, _ = load(str(model_dir), quantize=quantize, verbose=False)
    assert describe(base)["quantization"] == quantize
    trainer = Trainer(base, [JobSpec("j", spec, AdamW(lr=1e-2), target_modules=["q_proj", "v_proj"])])
    peft, layers, opt = _qlora_reference(load(str(model_dir), quantize=quantize, verbose=False)[0], trainer, spec,
                                         1e-2)
    for b in batch_stream(96, 3, 10, seed=2, steps=6):
        trainer.step({"j": b})
        opt.zero_grad()
        rs, rc = causal_lm(peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
        (rs.sum() / rc.sum()).backward()
        opt.step()
    trainer.flush()
    errs = []
    for site, a in trainer.adapters("j").items():
        want = layers[site]
        assert want.lora_B["default"].weight.abs().max() > 0  # it trained
        errs += [rel_err(a.A.detach(), want.lora_A["default"].weight.detach()),
                 rel_err(a.B.detach(), want.lora_B["default"].weight.detach())]
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("adapter,targets", [(Linear(), ["q_proj"]), (MLP(hidden=8), ["v_proj"]),
                                             (Houlsby(hidden=8), None), (AdaLink(r=2), None),
                                             (CoDA(hidden=8), None)])
def test_every_adapter_kind_trains_on_a_4bit_base(model_dir, adapter, targets):
    base, _ = load(str(model_dir), quantize="nf4", verbose=False)
    trainer = Trainer(base, [JobSpec("j", adapter, AdamW(lr=1e-2), target_modules=targets)])
    losses = [trainer.step({"j": b})["j"] for b in batch_stream(96, 3, 10, seed=3, steps=3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [a for a in trainer.adapters("j").values() if any(p.abs().sum() > 0 for p in a.parameters())]
    assert moved and all(p.dtype == torch.float32 for a in moved for p in a.parameters())


def test_a_bf16_base_trains_with_float32_adapters(model_dir):
    base, _ = load(str(model_dir), dtype="bfloat16", verbose=False)
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert describe(base)["dtype"] == "bfloat16"
    trainer = Trainer(base, [JobSpec("j", LowRank(r=4), AdamW(lr=3e-2), target_modules=["q_proj", "v_proj"])])
    batch = random_batch(96, 4, 12, 5)
    first = trainer.step({"j": batch})["j"]
    for _ in range(12):
        last = trainer.step({"j": batch})["j"]
    assert last < first  # it learns the batch
    assert all(p.dtype == torch.float32 for a in trainer.adapters("j").values() for p in a.parameters())


@pytest.mark.parametrize("adapter,targets", [(LowRank(r=4, dropout=0.1), ["q_proj", "v_proj"]),
                                             (MLP(hidden=8), ["q_proj", "v_proj", "o_proj"]),
                                             (Houlsby(hidden=8), None)])
def test_checkpointing_captures_the_same_x_and_g_bit_for_bit(adapter, targets):
    """Blocks recomputed in the backward give every packet exactly as without (parallel and
    sequential sites, shared inputs, an adapter's dropout), and shared inputs still travel once."""
    out = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the adapter's dropout: the same draws both times
        host = Host(tiny("llama", layers=3), checkpointing=checkpointing)
        host.add_job(JobSpec("a", adapter, target_modules=targets))
        g = torch.Generator().manual_seed(1)
        for a in host.jobs["a"].adapters.values():
            for p in a.parameters():
                p.data.normal_(0, 0.1, generator=g)
        streamed = []
        result = host.step(random_batch(96, 3, 10, 0) | {"jobs": ["a"] * 3}, emit=streamed.extend, steps={"a": 4})
        out[checkpointing] = (result.losses, {p.site: p for p in streamed})
    (l0, p0), (l1, p1) = out[False], out[True]
    assert l0 == l1 and p0.keys() == p1.keys()
    for site in p0:
        assert torch.equal(p0[site].x, p1[site].x) and torch.equal(p0[site].g, p1[site].g), site
    assert len({id(p.x) for p in p1.values()}) == len({id(p.x) for p in p0.values()})  # shared x, once


def test_checkpointing_and_offload_keep_the_trajectory(model_dir, tmp_path):
    """The same job on the plain model, with checkpointing, and spread over devices with a layer
    offloaded to disk (accelerate's `device_map`, the offload path it offers on a CPU)."""
    runs = {}
    for name, kw in (("plain", {}), ("offload", {"device_map": {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                                  "model.layers.1": "disk", "model.norm": "cpu",
                                                                  "model.rotary_emb": "cpu", "lm_head": "cpu"},
                                                   "offload_dir": tmp_path / "offload"})):
        base, _ = load(str(model_dir), verbose=False, **kw)
        if name == "offload":
            assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # on disk until its forward
        for checkpointing in (False, True):
            trainer = Trainer(base, [JobSpec("j", LowRank(r=4), AdamW(lr=1e-2), target_modules=["q_proj", "v_proj"])],
                              checkpointing=checkpointing)
            for b in batch_stream(96, 3, 10, seed=4, steps=4):
                trainer.step({"j": b})
            runs[(name, checkpointing)] = {s: (a.A.detach().clone(), a.B.detach().clone())
                                           for s, a in trainer.adapters("j").items()}
            trainer.host.remove_job("j")  # the model is shared by the runs: its hooks go
            if trainer.host.checkpointing:
                trainer.host.checkpointing.remove()
    want = runs[("plain", False)]
    for key, got in runs.items():
        assert got.keys() == want.keys(), key
        for s in want:
            assert torch.allclose(got[s][0], want[s][0], rtol=0, atol=1e-6), (key, s)
            assert torch.allclose(got[s][1], want[s][1], rtol=0, atol=1e-6), (key, s)
    assert runs[("plain", True)] and all(torch.equal(runs[("plain", True)][s][1], want[s][1]) for s in want)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A model as users have one on disk: sharded safetensors with an index, and its tokenizer (SmolLM2's,
    chat template included) beside it."""
    from colaflow.models import load_tokenizer

    path = tmp_path_factory.mktemp("sharded")
    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny("llama", hidden=128, layers=2, vocab=len(tokenizer))
    model.config.max_position_embeddings = 256
    model.save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    return path


def test_a_sharded_checkpoint_loads_with_its_tokenizer_and_chat_template(checkpoint_dir):
    model, tokenizer = load(str(checkpoint_dir), verbose=False)
    want = tiny("llama", hidden=128, layers=2, vocab=len(tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    assert tokenizer.chat_template
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert model.config._name_or_path == str(checkpoint_dir)  # what a PEFT export names


@pytest.mark.slow
def test_serve_with_a_large_model_s_options_trains_over_grpc(checkpoint_dir):
    """`colaflow serve --dtype --quantize --device-map --checkpointing --max-memory` on a sharded
    checkpoint: text jobs tokenised by the server's tokenizer train end to end with an edge daemon,
    and a job whose step cannot fit the memory promised is refused at submit, saying what would."""
    from colaflow import Session
    from colaflow.errors import ResourceExhausted
    from colaflow.local import LocalCluster

    args = ("--dtype", "bfloat16", "--quantize", "nf4", "--device-map", "auto", "--checkpointing",
            "--max-memory", "512MiB", "--threads", "1")
    with LocalCluster(str(checkpoint_dir), workers=1, server_args=args) as cluster, \
            Session(address=cluster.address) as session:
        rows = [{"prompt": f"Fact {i}:", "completion": f" the answer is {i}."} for i in range(8)]
        job = session.submit(rows, steps=3, batch_size=4, adapter=LowRank(r=4), targets=["q_proj", "v_proj"])
        assert job.wait(timeout=300, progress=False)["state"] == "done"
        assert all(m["loss"] > 0 for m in job.metrics())
        big = [{"text": "word " * 240} for _ in range(512)]  # 512 rows of ~240 tokens in one batch
        with pytest.raises(ResourceExhausted, match="would fit"):
            session.submit(big, steps=1, batch_size=512)


_MEASURE = """
import json, sys, torch
from colaflow import JobSpec, LowRank
from colaflow.bench.common import peak_during, token_batch
from colaflow.engine.host import Host
from colaflow.engine.memory import estimate
from colaflow.models import tiny
torch.set_num_threads(1)
checkpointing = sys.argv[1] == "1"
model = tiny("llama", hidden=256, layers=4, vocab=512)
host = Host(model, checkpointing=checkpointing)
sites = host.add_job(JobSpec("a", LowRank(r=8), target_modules=["q_proj", "v_proj"]))
batch = token_batch(512, 8, 256, 0) | {"jobs": ["a"] * 8}
sink = []
host.step(batch, emit=sink.extend)
sink.clear()
peak = peak_during(lambda: (host.step(batch, emit=sink.extend), sink.clear()))
plan = estimate(model, sites, 8, 256)
print(json.dumps({"peak": peak, "estimate": plan.step_checkpointed if checkpointing else plan.step}))
"""


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM")
def test_the_memory_estimate_covers_a_measured_step_and_checkpointing_saves_most_of_it():
    """A step's peak resident memory, measured in a fresh process, stays under what admission
    promised, with and without checkpointing; and checkpointing keeps well under half of it."""
    import json
    import os
    import subprocess
    import sys

    got = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _MEASURE, flag], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        assert out.returncode == 0, out.stderr[-2000:]
        got[flag] = json.loads(out.stdout.strip().splitlines()[-1])
    for flag, m in got.items():
        assert m["peak"] <= m["estimate"] <= 4 * max(m["peak"], 64 << 20), (flag, m)
    assert got["1"]["peak"] <= 0.6 * got["0"]["peak"], got


def test_admission_promises_memory_and_turns_checkpointing_on_only_for_the_job_that_needs_it():
    """`checkpointing="auto"` under `max_memory`: a small job runs without recompute, a job whose step
    fits only checkpointed turns it on, a job that fits neither way is refused saying what would — and
    nothing of a refused job stays hosted."""
    from colaflow.engine.memory import estimate, kept_steps
    from colaflow.engine.weights import describe
    from colaflow.errors import ResourceExhausted

    model = tiny("llama", hidden=256, layers=4, vocab=512)
    spec = lambda job: JobSpec(job, LowRank(r=8), target_modules=["q_proj", "v_proj"])  # noqa: E731
    probe = Host(model)
    sites = probe.resolve(spec("probe"))
    big, small = estimate(model, sites, 8, 256), estimate(model, sites, 1, 16)
    packets = kept_steps(spec("a")) * (big.packets + small.packets)
    # steps run one at a time and packets are kept together: the budget sits between the two jobs with
    # the big one checkpointed and the two without
    low, high = max(small.step, big.step_checkpointed) + packets, big.step + packets
    assert low < high
    budget = describe(model)["resident_bytes"] + (low + high) // 2
    host = Host(model, checkpointing="auto", max_memory=budget)
    host.add_job(spec("a"), shape=(1, 16))
    assert host.checkpointing is None and not host.jobs["a"].fit.checkpointed
    host.add_job(spec("b"), shape=(8, 256))
    assert host.jobs["b"].fit.checkpointed and host.checkpointing is not None
    held = host.held()
    assert held["max_memory"] == budget and held["promised_step"] == host.jobs["b"].fit.step
    with pytest.raises(ResourceExhausted, match=r"cannot fit this server's memory: 64 rows x 1024 tokens .* would fit"):
        host.add_job(spec("c"), shape=(64, 1024))
    assert set(host.jobs) == {"a", "b"}
    host.remove_job("b")
    assert host.held()["promised_step"] == host.jobs["a"].fit.step  # b's promise is released


def test_checkpointing_keeps_x_outside_the_blocks_and_a_merged_job_s_g():
    """Checkpointed, a site outside every block (lm_head) still keeps its x (not zeros), and a merged job's
    g are those of the unmerged step (its replay would otherwise run the base weights)."""
    out = {}
    for checkpointing in (False, True):
        host = Host(tiny("llama", layers=2), checkpointing=checkpointing)
        host.add_job(JobSpec("a", LowRank(r=2), merge=True, target_modules=["q_proj", "v_proj", "lm_head"]))
        g = torch.Generator().manual_seed(1)
        for a in host.jobs["a"].adapters.values():
            for p in a.parameters():
                p.data.normal_(0, 0.3, generator=g)
        streamed = []
        host.step(random_batch(96, 3, 10, 0) | {"jobs": ["a"] * 3}, emit=streamed.extend)
        out[checkpointing] = {p.site: p for p in streamed}
    assert out[False].keys() == out[True].keys()
    for site, want in out[False].items():
        got = out[True][site]
        # (merged and unmerged differ in rounding only; before, lm_head's x was all zeros and g were off by ~g)
        assert got.x.abs().sum() > 0 and torch.allclose(got.x, want.x, rtol=0, atol=1e-5), site
        assert torch.allclose(got.g, want.g, rtol=0, atol=1e-6), site


def test_a_checkpointed_model_serves_a_second_host_and_its_wrap_comes_off_cleanly(model_dir, tmp_path):
    """Another Trainer on a model a checkpointed one used steps as usual (the blocks replay only within
    their own host's step), and `remove` gives an offloaded block accelerate's forward back."""
    model, b = tiny("llama", layers=2), random_batch(96, 3, 10, 0)
    first = Trainer(model, [JobSpec("j", LowRank(r=2), AdamW(lr=1e-2), target_modules=["q_proj"])], checkpointing=True)
    first.step({"j": b})
    first.host.remove_job("j")
    second = Trainer(model, [JobSpec("k", LowRank(r=2), AdamW(lr=1e-2), target_modules=["q_proj"])])
    assert torch.isfinite(torch.tensor(second.step({"k": b})["k"]))
    from colaflow.engine.checkpointing import Checkpointing

    base, _ = load(str(model_dir), verbose=False, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                              "model.layers.1": "disk", "model.norm": "cpu",
                                                              "model.rotary_emb": "cpu", "lm_head": "cpu"},
                   offload_dir=tmp_path / "offload")
    block = base.model.layers[1]
    hooked = block.__dict__["forward"]  # accelerate's
    Checkpointing(base, __import__("contextlib").nullcontext).remove()
    assert block.__dict__["forward"] is hooked


_SAVED = """
import json, sys, torch
import transformers as tf
from colaflow import JobSpec, LowRank
from colaflow.engine.host import Host
from colaflow.engine.memory import FIXED, SAFETY, estimate
torch.set_num_threads(1)
eager = sys.argv[1] == "eager"
cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                     attn_implementation="eager" if eager else "sdpa")
torch.manual_seed(0)
model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
host = Host(model)
sites = host.add_job(JobSpec("a", LowRank(r=2), target_modules=["q_proj"] if eager else ["q_proj", "lm_head"]))
seen = {}
def pack(t):
    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
B, T = 2, 256
batch = {"input_ids": torch.randint(0, 2048, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
         "labels": torch.randint(0, 2048, (B, T)), "jobs": ["a"] * B}
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    host.step(batch, emit=lambda ps: None)
plan = estimate(model, sites, B, T, host._whole_logits(sites))
print(json.dumps({"saved": sum(seen.values()), "counted": (plan.step - FIXED) / SAFETY}))
"""


@pytest.mark.parametrize("case", ["eager", "unfused"])
def test_the_estimate_counts_what_autograd_keeps_in_bf16_eager_attention_and_unfused_logits(case):
    """What a bf16 step's autograd keeps stays within the estimate's count (before its safety margin): eager
    attention keeps a float32 softmax beside its bf16 probabilities, and an adapted head's loss the whole logits."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SAVED, case], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["saved"] <= got["counted"], got


def test_admission_counts_offloaded_weights_and_a_tied_embedding_once(model_dir, tmp_path):
    """A step without checkpointing keeps every offloaded weight it brought in (autograd saves them); one
    checkpointed, one block's. A tied lm_head is one tensor, held once."""
    import transformers as tf

    from colaflow.engine.memory import SAFETY, estimate

    base, _ = load(str(model_dir), verbose=False, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                              "model.layers.1": "disk", "model.norm": "cpu",
                                                              "model.rotary_emb": "cpu", "lm_head": "cpu"},
                   offload_dir=tmp_path / "offload")
    held = describe(base)
    offloaded = held["weight_bytes"] - held["resident_bytes"]
    assert offloaded > 0
    host = Host(base, checkpointing="auto", max_memory=1 << 40)
    sites = host.add_job(JobSpec("a", LowRank(r=2), target_modules=["q_proj"]), shape=(2, 16))
    plan = estimate(base, sites, 2, 16)
    assert host.jobs["a"].fit.plan.step == plan.step + int(SAFETY * offloaded)
    assert host.jobs["a"].fit.plan.step_checkpointed == plan.step_checkpointed + int(SAFETY * offloaded / 2)
    tied = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True))
    assert describe(tied)["weight_bytes"] == sum(t.numel() * t.element_size()
                                                 for t in (*tied.parameters(), *tied.buffers()))


def test_a_refusal_bisects_the_rows_that_would_fit():
    """The largest batch that fits is found in a few dozen estimates, whatever the rows (a data map's own)."""
    from colaflow.engine import memory
    from colaflow.errors import ResourceExhausted

    host = Host(tiny("llama", hidden=64, layers=2), max_memory=1 << 30)
    spec = JobSpec("a", LowRank(r=2), target_modules=["q_proj"])
    sites = host.resolve(spec)
    calls = []
    plan = host.memory._plan
    host.memory._plan = lambda *a: calls.append(a) or plan(*a)
    with pytest.raises(ResourceExhausted, match="would fit") as refused:
        host.add_job(spec, sites=sites, shape=(10**6, 128))
    assert len(calls) < 100
    rows = int(str(refused.value).split("; ")[-2].split(" rows")[0].split()[-1])
    fits = [memory.Fit(p, False, p.step, memory.kept_steps(spec) * p.packets)
            for p in (plan(spec, sites, r, 128) for r in (rows, rows + 1))]
    assert host.memory._room(fits[:1]) >= 0 > host.memory._room(fits[1:])


def test_a_random_model_takes_auto_dtype_and_refuses_what_it_cannot_hold(model_dir):
    model, _ = load(f"random:{model_dir}", dtype="auto", verbose=False)  # (a GPU's default)
    assert next(model.parameters()).dtype == torch.float32
    for kw in ({"quantize": "nf4"}, {"device_map": "auto"}):
        with pytest.raises(ValueError, match="are for checkpoints"):
            load(f"random:{model_dir}", verbose=False, **kw)


def test_auto_checkpointing_on_a_model_without_blocks_refuses_plainly():
    """`checkpointing="auto"` on a model with no repeated blocks sizes a job without recompute, and a
    job too big for that is refused by the memory it needs — not admitted as checkpointed and then
    failing on blocks it does not have."""
    from torch import nn

    from colaflow.engine.loss import seq_cls
    from colaflow.errors import ResourceExhausted

    class Flat(nn.Module):  # one linear site, no ModuleList of layers
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, input_ids=None, attention_mask=None, **_):
            return self.out(self.proj(torch.nn.functional.one_hot(input_ids % 16, 16).float()).mean(1))

    host = Host(Flat(), seq_cls, checkpointing="auto", max_memory=256 << 20)
    spec = JobSpec("j", LowRank(r=2), target_modules=["proj"])
    with pytest.raises(ResourceExhausted, match="cannot fit") as e:
        host.add_job(spec, shape=(4096, 65536))
    assert "checkpointing" not in str(e.value) and host.checkpointing is None and not host.jobs
    host.add_job(spec, shape=(2, 8))
    assert host.checkpointing is None and not host.jobs["j"].fit.checkpointed
