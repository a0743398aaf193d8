"""Invariants 2, 3 and 6 on the server's step: no parameter gradients, tenant isolation, exact merge."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import batch_stream, random_batch, rel_err

from colaflow import MLP, AdamW, JobSpec, Linear, LowRank, Trainer
from colaflow.adapters.merge import merged
from colaflow.engine.host import Host
from colaflow.models import tiny


def test_server_step_computes_no_parameter_gradient():
    model = tiny("llama")
    host = Host(model)
    host.add_job(JobSpec("a", LowRank(r=4)))
    result = host.step(random_batch(96, 3, 10, 0) | {"jobs": ["a"] * 3})
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters())
    for job in host.jobs.values():
        assert all(p.grad is None and not p.requires_grad for a in job.adapters.values() for p in a.parameters())
    assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(host).values())
    # one packet per (job, site), with only the rows of tokens some loss depends on: real tokens
    # less each row's last one (no label follows it, so its gradient is exactly zero)
    mask = random_batch(96, 3, 10, 0)["attention_mask"]
    assert len(result.packets) == 4
    for p in result.packets:
        assert p.x.shape[0] == p.g.shape[0] == int(mask.sum()) - mask.shape[0]
    by_input: dict[int, torch.Tensor] = {}  # q_proj and v_proj share x: every row kept is live in one of them
    for p in result.packets:
        by_input[id(p.x)] = by_input.get(id(p.x), 0) + p.g.abs().amax(-1)
    assert len(by_input) == 2 and all(bool(v.gt(0).all()) for v in by_input.values())


def test_shared_input_is_sent_once():
    host = Host(tiny("llama"))
    host.add_job(JobSpec("a"))
    packets = host.step(random_batch(96, 2, 8, 0) | {"jobs": ["a", "a"]}).packets
    by_site = {p.site: p for p in packets}
    q, v = by_site["model.layers.0.self_attn.q_proj"], by_site["model.layers.0.self_attn.v_proj"]
    assert q.x is v.x  # q_proj and v_proj read the same input: one tensor for both


@pytest.mark.parametrize("adapter", [LowRank(r=4), Linear(bias=True), MLP(hidden=8)])
def test_tenant_isolation(adapter):
    """A job's trajectory is the same alone and co-batched with other jobs' rows."""
    steps = 6
    data_a = batch_stream(96, 2, 10, seed=1, steps=steps)
    data_b = batch_stream(96, 3, 14, seed=2, steps=steps)
    spec_a = JobSpec("a", adapter, AdamW(lr=1e-2))
    spec_b = JobSpec("b", LowRank(r=4, alpha=32), AdamW(lr=5e-2), seed=7)
    spec_c = JobSpec("c", adapter, AdamW(lr=3e-2), seed=3)
    alone = Trainer(tiny("llama"), [spec_a])
    mixed = Trainer(tiny("llama"), [spec_a, spec_b, spec_c])
    for i in range(steps):
        la = alone.step({"a": data_a[i]})["a"]
        lm = mixed.step({"a": data_a[i], "b": data_b[i], "c": data_b[-1 - i]})
        assert abs(la - lm["a"]) <= 1e-5 * abs(la)
    alone.flush(), mixed.flush()
    for site, a in alone.adapters("a").items():
        for (name, p), q in zip(a.named_parameters(), mixed.adapters("a")[site].parameters()):
            # equal up to the rounding of differently-shaped batched matmuls in the base model
            assert rel_err(q.detach(), p.detach()) <= 1e-4, (site, name)
    # and the other jobs did train: their adapters moved away from zero
    assert any(a.B.abs().sum() > 0 for a in mixed.adapters("b").values())


def test_job_touches_only_its_rows():
    """Changing job b's adapter leaves job a's rows of the same forward untouched."""
    model = tiny("llama")
    host = Host(model)
    host.add_job(JobSpec("a"))
    host.add_job(JobSpec("b"))
    batch = random_batch(96, 4, 8, 0) | {"jobs": ["a", "b", "a", "b"]}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def logits():
        host._ctx = host._context(batch["jobs"], capture=False)
        try:
            return model(**inputs).logits
        finally:
            host._ctx = None

    before = logits()
    with torch.no_grad():
        for a in host.jobs["b"].adapters.values():
            a.B.normal_()
    after = logits()
    assert torch.equal(before[[0, 2]], after[[0, 2]])
    assert not torch.allclose(before[[1, 3]], after[[1, 3]])


@pytest.mark.parametrize("family,adapter", [("llama", LowRank(r=4)), ("gpt2", LowRank(r=4)),
                                            ("llama", Linear()), ("gpt2", Linear(bias=True))])
def test_merged_forward_equals_unmerged(family, adapter):
    model = tiny(family)
    host = Host(model)
    host.add_job(JobSpec("a", adapter, merge=True))
    for a in host.jobs["a"].adapters.values():
        for p in a.parameters():
            p.data.normal_(0, 0.1)
    batch = random_batch(96, 2, 8, 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with host.using("a"):
            unmerged = model(**inputs).logits
        ctx = host._context(["a"], capture=False)
        assert ctx.merged == set(host.jobs["a"].adapters)
        host._ctx = ctx
        merged_out = host._forward(inputs, ctx).logits
        host._ctx = None
        plain = model(**inputs).logits
    assert torch.allclose(merged_out, unmerged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, unmerged, atol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pristine.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_never_drifts(dtype):
    model = tiny("llama").to(dtype)
    host = Host(model)
    host.add_job(JobSpec("a", LowRank(r=4)))
    adapters = host.jobs["a"].adapters
    for a in adapters.values():
        a.to(dtype)
        a.B.data.normal_(0, 0.05)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    site = next(iter(adapters))
    for i in range(1000):
        with merged(model, adapters):
            if i == 0:
                assert not torch.equal(model.get_submodule(site).weight, pristine[f"{site}.weight"])
    for k, v in pristine.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_merged_training_leaves_base_weights_bitwise():
    model = tiny("gpt2")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, [JobSpec("a", LowRank(r=4), AdamW(lr=1e-2), merge=True)])
    for b in batch_stream(96, 2, 8, seed=3, steps=5):
        trainer.step({"a": b})
    assert trainer.host.jobs["a"].merged  # the merged path ran
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pristine.items())


def test_each_site_gets_its_own_input_even_when_temporaries_are_freed():
    """Inputs that are freed mid-forward must not be mistaken for one another (no id() reuse)."""
    from torch import nn

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(12))

        def forward(self, x):
            for layer in self.layers:
                x = layer(torch.tanh(x) * 1.0)  # a fresh temporary per layer, freed after use
            return x

    net = Chain()
    host = Host(net, loss_fn=lambda out, b: (out.pow(2).sum((1, 2)), torch.ones(out.shape[0])))
    host.add_job(JobSpec("a", LowRank(r=2), target_modules=r"layers\.\d+"))
    x = torch.randn(2, 3, 8)
    packets = {p.site: p for p in host.step({"x": x, "jobs": ["a", "a"]}).packets}
    h = x
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            inp = torch.tanh(h) * 1.0
            assert torch.equal(packets[f"layers.{i}"].x, inp.flatten(0, 1)), i  # (B*T, 8): token rows
            h = layer(inp)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_packets_stream_out_of_the_backward_top_layer_first():
    """With `emit`, each packet leaves while the backward still runs (top layer first, before any
    lower layer's gradient exists), and the packets equal the collected ones bit for bit."""
    model = tiny("llama")
    host = Host(model)
    host.add_job(JobSpec("a", LowRank(r=4)))
    for a in host.jobs["a"].adapters.values():
        a.B.data.normal_(0, 0.1)
    batch = random_batch(96, 3, 10, 0) | {"jobs": ["a"] * 3}
    collected = {p.site: p for p in host.step(batch).packets}
    seen, during = [], []
    first_layer = model.model.layers[0].self_attn.q_proj

    def bottom_backward(*_):  # runs when the backward reaches the first layer's q_proj
        during.append(list(seen))
    first_layer.register_full_backward_pre_hook(bottom_backward)
    def emit(group):
        for p in group:
            seen.append(p.site)
            collected[("new", p.site)] = p
    result = host.step(batch, emit=emit)
    assert result.packets == [] and len(seen) == len(host.jobs["a"].sites)
    top = len(model.model.layers) - 1
    assert seen[0].startswith(f"model.layers.{top}.") and seen[-1].startswith("model.layers.0.")
    # when the backward reached layer 0, every upper layer's packets had already left
    assert during and {s for s in during[0]} == {s for s in seen if not s.startswith("model.layers.0.")}
    for site in seen:
        old, new = collected[site], collected[("new", site)]
        assert torch.equal(old.x, new.x) and torch.equal(old.g, new.g) and old.version == new.version


def test_micro_batches_keep_jobs_whole():
    from colaflow.engine.mixed import micro_batches

    parts = micro_batches(["a", "b", "a", "c", "c", "d"], 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]  # a+b, c+d: never a job split
    assert [p.tolist() for p in micro_batches(["a", "a", "a", "b"], 2)] == [[0, 1, 2], [3]]  # too big: alone
    assert micro_batches(["a"] * 9, 2) is None and micro_batches(["a", "b"], 4) is None
    with pytest.raises(ValueError, match="mix_rows"):
        Host(tiny("llama"), mix_rows=0)


@pytest.mark.parametrize("family,alphas", [("llama", "differ"), ("gpt2", "differ"), ("llama", "same")])
def test_mixed_step_is_the_same_in_any_micro_batches_and_with_stacked_adapters(family, alphas, monkeypatch):
    """Micro-batches of whole jobs and the stacked LoRA call change no job's loss or packets
    (beyond float rounding) against each job stepping alone."""
    import colaflow.engine.hooks as host_module  # the site hooks stack LoRA adapters

    specs = [JobSpec(f"j{k}", LowRank(r=4, alpha=4 * (k + 1) if alphas == "differ" else 8), seed=k) for k in range(4)]
    batch = random_batch(96, 4, 10, 0, ragged=False) | {"jobs": [s.job_id for s in specs]}

    def run(mix_rows: int, stack: bool = True):
        host = Host(tiny(family), mix_rows=mix_rows)
        for s in specs:
            host.add_job(s)
            g = torch.Generator().manual_seed(len(s.job_id) + int(s.job_id[1:]))
            for a in host.jobs[s.job_id].adapters.values():
                a.B.data.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
        if not stack:
            monkeypatch.setattr(host_module, "stackable", lambda *a: False)
        result = host.step(batch)
        monkeypatch.undo()
        return result.losses, {(p.job, p.site): p for p in result.packets}

    alone_losses, alone = run(1)
    for mix_rows, stack in [(2, True), (4, True), (4, False)]:
        losses, packets = run(mix_rows, stack)
        assert packets.keys() == alone.keys()
        for j, v in alone_losses.items():
            assert abs(losses[j] - v) <= 1e-5 * abs(v), (mix_rows, stack, j)
        for key, p in packets.items():
            assert rel_err(p.g, alone[key].g) <= 1e-4 and rel_err(p.x, alone[key].x) <= 1e-5, (mix_rows, stack, key)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_head_loss_equals_autograd_and_keeps_no_logits(family):
    """The loss fused with the head (colaflow.engine.lmhead) gives autograd's losses and packets, and the
    step saves no (B, T, V) tensor for its backward (the unfused step does)."""
    batch = random_batch(96, 3, 10, 0) | {"jobs": ["a", "a", "b"]}
    vocab, biggest = 100, {}  # not a multiple of the hidden size: no weight has this last dim

    def run(fuse: bool):
        host = Host(tiny(family, vocab=vocab), mix_rows=8)
        for j in ("a", "b"):
            host.add_job(JobSpec(j, LowRank(r=4), seed=ord(j)))
            for a in host.jobs[j].adapters.values():
                a.B.data.normal_(0, 0.1)
        if not fuse:
            host._head = None
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.shape) or t, lambda t: t):
            result = host.step(batch)
        biggest[fuse] = max([s.numel() for s in sizes if s and s[-1] == vocab], default=0)  # logits-like
        return result.losses, {(p.job, p.site): p for p in result.packets}

    fused_losses, fused = run(True)
    losses, plain = run(False)
    assert fused.keys() == plain.keys()
    for j, v in losses.items():
        assert abs(fused_losses[j] - v) <= 1e-6 * abs(v)
    for key, p in plain.items():
        assert torch.equal(fused[key].x, p.x) and rel_err(fused[key].g, p.g) <= 1e-5, key
    assert biggest[False] >= 3 * 10 * vocab > biggest[True]  # (B, T, V) kept only without fusing


def test_a_model_that_changes_its_logits_after_the_head_is_not_fused():
    """Soft-capping, scaling or anything after the head: the step falls back to autograd's loss."""
    from colaflow.engine.lmhead import head_of

    class Scaled(torch.nn.Module):  # logits * 2 after the head
        def __init__(self):
            super().__init__()
            self.inner = tiny("llama")
            self.config = self.inner.config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits * 2
            return out

    assert head_of(tiny("llama")) is not None and head_of(Scaled()) is None
    model = Scaled()
    host = Host(model)
    host.add_job(JobSpec("a", LowRank(r=4)))
    batch = random_batch(96, 2, 8, 0)
    loss = host.step(batch | {"jobs": ["a", "a"]}).losses["a"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    expect = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(loss - float(expect)) <= 1e-5 * float(expect)


class _Toy(torch.nn.Module):
    """Embedding, one adapted layer (named `site`), head; `layer` says how the layer reads the tokens."""

    def __init__(self, site: str, vocab: int = 50, hidden: int = 16):
        super().__init__()
        self.config, self.site = SimpleNamespace(vocab_size=vocab), site
        self.embed, self.head = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab)
        setattr(self, site, torch.nn.Linear(hidden, hidden))

    def forward(self, input_ids, attention_mask=None):
        h = self.layer(getattr(self, self.site), self.embed(input_ids), input_ids)
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


class _SequenceFirst(_Toy):
    """The layer runs sequence-first, (T, B, H), as torch's nn.Transformer* do by default."""

    def __init__(self):
        super().__init__("proj")

    def layer(self, proj, h, input_ids):
        return proj(h.transpose(0, 1)).transpose(0, 1)


def test_a_mixed_batch_never_splits_a_sequence_first_site_along_its_tokens():
    """With as many tokens as rows, a (T, B, H) input has B rows first too: the step must not
    hand each job's adapter tokens of every job (it refuses; the coordinator steps jobs alone)."""
    torch.manual_seed(0)
    host = Host(_SequenceFirst(), mix_rows=8)
    for j in "ab":
        host.add_job(JobSpec(j, LowRank(r=2), target_modules=["proj"], seed=ord(j)))
    square = random_batch(50, 4, 4, 0, ragged=False)
    with pytest.raises(ValueError, match="step its jobs alone"):
        host.step(square | {"jobs": ["a", "a", "b", "b"]})
    assert host.layout.seen == {"proj": None}  # the one-row probe saw (T, 1, H)
    for batch in (random_batch(50, 4, 5, 1, ragged=False), square):
        with pytest.raises(ValueError, match="step its jobs alone"):
            host.step(batch | {"jobs": ["a", "a", "b", "b"]})
    assert host.step(square | {"jobs": ["a"] * 4}).losses["a"] > 0  # alone it steps


class _Routed(_Toy):
    """An MoE-like site: an expert reads only the tokens routed to it, as (tokens, H)."""

    def __init__(self):
        super().__init__("expert")

    def layer(self, expert, h, input_ids):
        routed = input_ids % 2 == 0
        return h.masked_scatter(routed.unsqueeze(-1), expert(h[routed]))


def test_a_mixed_batch_never_splits_tokens_routed_to_an_expert_even_as_many_as_rows():
    host = Host(_Routed(), mix_rows=8)
    for j in "ab":
        host.add_job(JobSpec(j, LowRank(r=2), target_modules=["expert"], seed=ord(j)))
    ids = torch.tensor([[2, 3, 4, 5, 7], [1, 3, 5, 7, 9], [6, 1, 3, 5, 7], [1, 3, 5, 8, 9]])  # 4 routed, 4 rows
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match="step its jobs alone"):
        host.step(batch | {"jobs": ["a", "a", "b", "b"]})
    assert host.layout.seen == {"expert": None}


@pytest.mark.parametrize("family,targets", [("llama", None), ("llama", ["up_proj", "down_proj", "k_proj"]),
                                            ("gpt2", None)])
def test_a_square_mixed_batch_of_a_batch_first_model_equals_its_jobs_alone(family, targets):
    """rows == tokens: one row, once, shows the sites are batch-first; the jobs then mix exactly
    (sites whose input and output widths differ too: the probe must leave outputs alone)."""
    specs = [JobSpec(j, LowRank(r=4), target_modules=targets, seed=ord(j)) for j in "ab"]
    batch = random_batch(96, 4, 4, 3, ragged=False)

    def run(jobs: list[str]):
        torch.manual_seed(0)
        host = Host(tiny(family), mix_rows=8)
        for s in specs:
            host.add_job(s)
            for a in host.jobs[s.job_id].adapters.values():
                a.B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(ord(s.job_id)))
        rows = [i for i, j in enumerate(jobs) if j is not None]
        sub = {k: v[rows] for k, v in batch.items()} | {"jobs": [jobs[i] for i in rows]}
        return host, host.step(sub)

    host, mixed = run(["a", "a", "b", "b"])
    assert host.layout.seen.keys() == host._hooks.keys() and all(host.layout.seen.values())
    for job, rows in (("a", ["a", "a", None, None]), ("b", [None, None, "b", "b"])):
        _, alone = run(rows)
        assert abs(mixed.losses[job] - alone.losses[job]) <= 1e-5 * alone.losses[job]
        got = {p.site: p for p in mixed.packets if p.job == job}
        for p in alone.packets:
            assert rel_err(got[p.site].g, p.g) <= 1e-4 and torch.equal(got[p.site].x, p.x)


@pytest.mark.parametrize("fuse", [True, False])
def test_labels_out_of_the_vocabulary_name_their_job_and_int32_labels_step(fuse):
    host = Host(tiny("llama", vocab=100), mix_rows=8)
    for j in "ab":
        host.add_job(JobSpec(j, LowRank(r=4), seed=ord(j)))
    if not fuse:
        host._head = None
    batch = random_batch(100, 3, 8, 0) | {"jobs": ["a", "b", "b"]}
    expect = host.step(batch).losses
    got = host.step(batch | {"labels": batch["labels"].int()}).losses  # same values, int32
    assert got == pytest.approx(expect, rel=1e-6)
    for bad in (100, -5):
        labels = batch["labels"].clone()
        labels[2, 1] = bad
        with pytest.raises(ValueError, match=rf"job 'b': label {bad} is outside the vocabulary"):
            host.step(batch | {"labels": labels})


def test_a_bf16_model_steps_with_float32_adapters_as_peft_does():
    """Adapters stay float32 on a bf16 model (PEFT's default): x goes to float32 for the adapter,
    and the sum goes back to bf16. Same loss as PEFT's LoRA on the same model."""
    from peft import LoraConfig, get_peft_model

    model = tiny("llama").to(torch.bfloat16)
    host = Host(model)
    host.add_job(JobSpec("a", LowRank(r=4, alpha=8), target_modules=["q_proj", "v_proj"]))
    adapters = host.jobs["a"].adapters
    for a in adapters.values():
        a.B.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(p.dtype == torch.float32 for a in adapters.values() for p in a.parameters())
    batch = random_batch(96, 2, 8, 0)
    result = host.step(batch | {"jobs": ["a", "a"]})
    assert all(p.x.dtype == torch.bfloat16 and torch.isfinite(p.g).all() for p in result.packets)

    import copy
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, a in adapters.items():
            layer = pm.base_model.model.get_submodule(name)
            assert layer.lora_A["default"].weight.dtype == torch.float32
            layer.lora_A["default"].weight.copy_(a.A)
            layer.lora_B["default"].weight.copy_(a.B)
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    expect = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()))
    assert abs(result.losses["a"] - expect) <= 1e-6 * expect  # (adapters in bf16 would be ~3e-5 off)


def test_every_adapter_kind_steps_on_a_bf16_model():
    """bf16 is how a GPU serves: each kind's float32 adapter (a conditional kind's router included)
    reads the bf16 hidden states (CoDA's router once refused them: "mat1 and mat2 must have the same dtype")."""
    from colaflow import CoDA, Houlsby, Linear

    model = tiny("llama").to(torch.bfloat16)
    host = Host(model)
    kinds = {"low": LowRank(r=2), "lin": Linear(), "houl": Houlsby(hidden=4), "coda": CoDA(hidden=4, reduction=2)}
    for job, spec in kinds.items():
        host.add_job(JobSpec(job, spec))
    for job in kinds:
        result = host.step(random_batch(96, 2, 8, 0) | {"jobs": [job, job]})
        assert result.packets and all(torch.isfinite(p.g.float()).all() for p in result.packets), job


def test_tokens_without_an_attention_mask_count_each_jobs_rows():
    host = Host(tiny("llama"), mix_rows=8)
    for j in "ab":
        host.add_job(JobSpec(j, LowRank(r=4), seed=ord(j)))
    batch = random_batch(96, 4, 6, 0, ragged=False)
    del batch["attention_mask"]
    assert host.step(batch | {"jobs": ["a", "b", "b", "b"]}).tokens == {"a": 6, "b": 18}
    assert host.step(batch | {"jobs": ["a"] * 4}).tokens == {"a": 24}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_paths_with_host_side_pieces_run_on_the_models_device(device):
    """What meets the model's device from the host: a mixed batch's row indices, a black-box job's
    token ids, adapters merged from host memory (an export). On CPU this checks the test itself;
    `benchmarks/gpu.sh` runs it on CUDA, where each once failed or synchronised."""
    import copy

    from colaflow import SmallLM
    from colaflow.adapters.merge import merged

    model = tiny("llama").to(device)
    host = Host(model)
    for j in "ab":
        host.add_job(JobSpec(j, LowRank(r=4), seed=ord(j)))
    host.add_job(JobSpec("bb", SmallLM(top_k=8, hidden=8)))
    mixed = host.step(random_batch(96, 4, 8, 0) | {"jobs": ["a", "a", "b", "b"]})
    assert {p.job for p in mixed.packets} == {"a", "b"} and all(p.g.device.type == "cpu" for p in mixed.packets)
    blackbox = host.step(random_batch(96, 2, 8, 1) | {"jobs": ["bb", "bb"]})
    assert blackbox.packets and all(p.x.device.type == "cpu" for p in blackbox.packets)
    on_host = {n: copy.deepcopy(a).cpu() for n, a in host.jobs["a"].adapters.items()}
    for a in on_host.values():
        a.B.data.fill_(0.01)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with merged(model, on_host):
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_a_step_keeps_nothing_of_itself():
    """Each site's grad hook holds the step's context, and autograd holds the hooks out of the garbage
    collector's sight: the context once kept every step's x, g and graph alive (~155 KB a step here,
    gigabytes over a long job on a real model)."""
    import gc

    from colaflow import Trainer
    from colaflow.engine.hosted import StepContext

    trainer = Trainer(tiny("llama"), [JobSpec("a", LowRank(r=2))])
    batch = random_batch(96, 4, 16, 0)

    def live() -> tuple[int, int]:
        gc.collect()
        objs = gc.get_objects()
        return sum(isinstance(o, StepContext) for o in objs), sum(isinstance(o, torch.Tensor) for o in objs)
    for _ in range(5):
        trainer.step({"a": batch})
    ctxs, tensors = live()
    for _ in range(20):
        trainer.step({"a": batch})
    assert live() == (ctxs, tensors) and ctxs <= 1
