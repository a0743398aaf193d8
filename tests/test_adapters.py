"""Sites, adapter kinds, specs, and bad input refused with errors that name the site."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from colaflow import MLP, SGD, AdamW, AdapterSpec, JobSpec, Learner, Linear, LowRank, Packet, Schedule, find_sites
from colaflow.adapters.base import build_adapter, load_params, register_adapter
from colaflow.engine.host import Host
from colaflow.models import tiny
from colaflow.sites import site_of


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)


def test_default_sites_per_family():
    assert {s.name.rsplit(".", 1)[1] for s in find_sites(tiny("llama"))} == {"q_proj", "v_proj"}
    gpt2 = find_sites(tiny("gpt2"))
    assert [s.kind for s in gpt2] == ["conv1d", "conv1d"] and gpt2[0].out_features == 3 * gpt2[0].in_features
    assert {s.name.rsplit(".", 1)[1] for s in find_sites(tiny("bert"))} == {"query", "value"}


@pytest.mark.parametrize("family, config, suffixes", [
    ("qwen2", dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2), {"q_proj", "v_proj"}),
    ("opt", dict(ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32), {"q_proj", "v_proj"}),
    ("gpt_neox", dict(intermediate_size=64, num_attention_heads=4), {"query_key_value"}),
    ("phi3", dict(intermediate_size=64, num_attention_heads=4, pad_token_id=0), {"qkv_proj"}),
])
def test_default_sites_of_other_families_and_of_a_family_colaflow_does_not_name(family, config, suffixes):
    """PEFT's LoRA defaults for the families it names; for any other, the usual attention projections
    the model has (here: a Qwen2 under an unknown `model_type`); else an error listing what it has."""
    import transformers as tf

    cfg = tf.AutoConfig.for_model(family, vocab_size=64, hidden_size=32, num_hidden_layers=1, **config)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    assert {s.name.rsplit(".", 1)[1] for s in find_sites(model)} == suffixes
    model.config.model_type = "not-a-family"
    assert {s.name.rsplit(".", 1)[1] for s in find_sites(model)} == suffixes
    with pytest.raises(ValueError, match=r"no default `target_modules` for model family None.*end in \['0', '1'\]"):
        find_sites(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))


def test_regex_targets():
    sites = find_sites(tiny("llama"), r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert [s.name for s in sites] == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_unknown_target_lists_near_matches():
    with pytest.raises(ValueError, match="q_prj.*near matches.*q_proj"):
        find_sites(tiny("llama"), ["q_prj"])


def test_unsupported_module_type_names_the_site():
    with pytest.raises(TypeError, match="site `norm` is a LayerNorm"):
        find_sites(ConvNet(), ["norm"])


@pytest.mark.parametrize("spec", [LowRank(r=2), Linear(bias=True), MLP(hidden=4, layers=3, activation="gelu")])
def test_every_kind_starts_as_identity_on_every_site_kind(spec):
    net = ConvNet()
    inputs = {"emb": torch.randint(0, 20, (2, 7)), "fc": torch.randn(2, 7, 6), "conv": torch.randn(2, 3, 8, 8)}
    for site in find_sites(net, ["emb", "fc", "conv"]):
        if spec.kind == "mlp" and site.kind == "conv2d":
            with pytest.raises(ValueError, match="site `conv`"):
                build_adapter(spec, site)
            continue
        a = build_adapter(spec, site)
        delta = a(inputs[site.name])
        assert delta.shape == net.get_submodule(site.name)(inputs[site.name]).shape
        assert torch.count_nonzero(delta) == 0
        # and it is trainable: one fit on a random gradient moves the output
        learner = Learner(JobSpec("j", spec, SGD(lr=0.01)), site)
        g = torch.randn_like(delta)
        learner.consume(Packet("j", site.name, 0, 0, inputs[site.name], g))
        learner.consume(Packet("j", site.name, 1, 1, inputs[site.name], g))
        assert torch.count_nonzero(learner.adapter(inputs[site.name])) > 0


def test_lowrank_delta_weight_matches_forward():
    net = ConvNet()
    x = {"fc": torch.randn(3, 6), "conv": torch.randn(1, 3, 5, 5), "emb": torch.randint(0, 20, (4,))}
    for site in find_sites(net, ["fc", "conv", "emb"]):
        a = build_adapter(LowRank(r=2), site)
        a.B.data.normal_()
        a.A.data.normal_()
        dw, _ = a.delta_weight()
        mod = net.get_submodule(site.name)
        with torch.no_grad():
            base = mod(x[site.name])
            mod.weight += dw
            assert torch.allclose(mod(x[site.name]), base + a(x[site.name]), atol=1e-5)


def test_registry_refuses_duplicates_and_roundtrips_specs():
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(LowRank, object)
    for spec in (LowRank(r=4, alpha=2.0), Linear(bias=True), MLP(hidden=3)):
        assert AdapterSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown adapter `kind` 'nope'"):
        AdapterSpec.from_dict({"kind": "nope"})
    job = JobSpec("x", MLP(hidden=3), SGD(lr=0.1, momentum=0.5, schedule=Schedule("cosine", 2, 10)), ["fc"], 2, 1)
    assert JobSpec.from_dict(job.to_dict()) == job


@pytest.mark.parametrize("bad,match", [
    (lambda: LowRank(r=0), "`r` must be a positive int"),
    (lambda: LowRank(dropout=1.0), "`dropout`"),
    (lambda: MLP(layers=1), "`layers`"),
    (lambda: AdamW(lr=-1), "`lr` must be > 0"),
    (lambda: SGD(nesterov=True), "`nesterov` needs `momentum`"),
    (lambda: Schedule("linear", warmup=5, total=5), "needs `total` > `warmup`"),
    (lambda: JobSpec("bad id!"), "`job_id`"),
    (lambda: JobSpec("j", fit_interval=0), "`fit_interval`"),
    (lambda: JobSpec("j", merge="yes"), "`merge` must be true or false"),
    (lambda: JobSpec("j", seed="x"), "`seed` must be an int"),
])
def test_specs_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_schedules():
    lin = Schedule("linear", warmup=4, total=14)
    assert [round(lin.factor(i), 3) for i in (0, 3, 4, 9, 14, 20)] == [0.2, 0.8, 1.0, 0.5, 0.0, 0.0]
    cos = Schedule("cosine", warmup=0, total=10)
    assert cos.factor(0) == 1.0 and abs(cos.factor(5) - 0.5) < 1e-9 and cos.factor(10) < 1e-12
    assert Schedule().factor(1000) == 1.0


def test_bad_packets_are_refused_naming_the_site():
    site = site_of("model.fc", nn.Linear(6, 4))
    learner = Learner(JobSpec("j", LowRank(r=2)), site)
    x, g = torch.randn(5, 6), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"site `model.fc`: `x` has shape \(5, 7\)"):
        learner.consume(Packet("j", "model.fc", 0, 0, torch.randn(5, 7), g))
    with pytest.raises(ValueError, match=r"site `model.fc`: `g` has shape \(5, 3\)"):
        learner.consume(Packet("j", "model.fc", 0, 0, x, torch.randn(5, 3)))
    nan = g.clone()
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="site `model.fc`: gradient `g` .* NaN"):
        learner.consume(Packet("j", "model.fc", 0, 0, x, nan))
    with pytest.raises(ValueError, match="sent to the learner"):
        learner.consume(Packet("other", "model.fc", 0, 0, x, g))
    before = {k: v.clone() for k, v in learner.adapter.state_dict().items()}
    assert learner.version == 0 and not learner.buffer  # nothing was absorbed
    assert all(torch.equal(v, learner.adapter.state_dict()[k]) for k, v in before.items())


def test_adapter_site_shape_mismatch_is_refused():
    site = site_of("model.fc", nn.Linear(6, 4))
    a = build_adapter(LowRank(r=2), site)
    with pytest.raises(ValueError, match=r"site `model.fc`: parameter `B` has shape \(5, 2\)"):
        load_params(a, {"A": torch.zeros(2, 6), "B": torch.zeros(5, 2)})
    with pytest.raises(ValueError, match="site `model.fc`: adapter parameters"):
        load_params(a, {"A": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="non-finite"):
        load_params(a, {"A": torch.full((2, 6), float("inf")), "B": torch.zeros(4, 2)})


def test_server_refuses_nan_gradient_naming_the_site():
    model = tiny("llama")
    host = Host(model)
    host.add_job(JobSpec("a"))
    with torch.no_grad():  # poison the head: the loss and every site's gradient become NaN
        model.lm_head.weight[0, 0] = float("nan")
    ids = torch.randint(1, 96, (2, 6))
    # the top layer's gradients exist first, and the backward stops there
    top = len(model.model.layers) - 1
    with pytest.raises(FloatingPointError,
                       match=rf"site `model.layers.{top}.self_attn.(q|v)_proj`: gradient of job 'a'"):
        host.step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "jobs": ["a", "a"]})


def test_host_loads_the_version_it_is_given():
    """The scheduler picks the version; the host loads it, and a repeat of its version is a no-op."""
    host = Host(tiny("llama"))
    (site, *_) = host.add_job(JobSpec("a", LowRank(r=2)))
    from colaflow import Update
    params = {"A": torch.ones(2, 32), "B": torch.ones(32, 2)}
    host.apply(Update("a", site.name, 1, params, 0.0))
    host.apply(Update("a", site.name, 1, {"A": torch.zeros(2, 32), "B": torch.zeros(32, 2)}, 0.0))
    assert torch.equal(host.jobs["a"].adapters[site.name].A, torch.ones(2, 32))
    assert host.jobs["a"].versions[site.name] == 1
    with pytest.raises(KeyError, match="unknown job 'zz'"):
        host.apply(Update("zz", site.name, 1, params, 0.0))


def test_a_site_the_forward_never_calls_is_named():
    """T5's `shared` embedding is tied to, but is not, the module its encoder and decoder call."""
    import transformers as tf

    from colaflow.engine.loss import token_cls

    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=0))
    host = Host(t5, token_cls)
    host.add_job(JobSpec("a", LowRank(r=2), target_modules=["shared"]))
    ids = torch.randint(1, 32, (2, 5))
    with pytest.raises(RuntimeError, match="site `shared` of job 'a' was not called in the forward"):
        host.step({"input_ids": ids, "decoder_input_ids": ids, "labels": ids, "jobs": ["a", "a"]})
