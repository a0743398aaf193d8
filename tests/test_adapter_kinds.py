"""Adapter kinds beyond LoRA: sequential attach, Houlsby, AdaLink — each equal to ordinary backprop of
the same adapter (relative error <= 1e-5), each refusing bad specs and packets with a clear error."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_stream, random_batch, rel_err

from colaflow import AdaLink, AdamW, CoDA, Houlsby, JobSpec, Linear, LowRank, Packet, Trainer
from colaflow.adapters.base import AdapterSpec
from colaflow.control.protocol import Packets
from colaflow.engine.loss import causal_lm
from colaflow.learn.fit import check_packet
from colaflow.models import tiny
from colaflow.wire import serde

TOL = 1e-5


class BackpropReference:
    """The same adapters trained by ordinary backprop: a copy of the model whose site modules carry
    trainable copies of the job's initial adapters, h + f(x) (parallel) or h + f(h) (sequential)."""

    def __init__(self, model, trainer: Trainer, job_id: str, lr: float):
        self.model = copy.deepcopy(model)
        self.mask = None
        self.adapters = {s: copy.deepcopy(a).requires_grad_(True) for s, a in trainer.adapters(job_id).items()}
        for name, a in self.adapters.items():
            self.model.get_submodule(name).register_forward_hook(self._hook(a))
        params = [p for a in self.adapters.values() for p in a.parameters()]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def _hook(self, a):
        def hook(module, args, out):
            x = out if a.spec.attach == "sequential" else args[0]
            route = a.route(args[0])
            delta = a(x) if route is None else a(x, route)
            sel = a.select(x, self.mask)  # CoDA: only the router's top tokens of each row
            return out + (delta if sel is None else delta * sel.unsqueeze(-1))
        return hook

    def step(self, batches: list[dict]) -> None:
        self.opt.zero_grad()
        for b in batches:
            self.mask = b["attention_mask"]
            rs, rc = causal_lm(self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
            (rs.sum() / rc.sum()).backward()
        self.opt.step()


def _max_err(trainer: Trainer, job_id: str, ref: BackpropReference) -> float:
    errs = []
    for site, a in trainer.adapters(job_id).items():
        want = dict(ref.adapters[site].named_parameters())
        for n, p in a.named_parameters():
            errs.append(rel_err(p.detach(), want[n].detach()))
        assert any(float(want[n].detach().abs().max()) > 0 for n in want)
    return max(errs)


CASES = {
    "lowrank-sequential": ("llama", LowRank(r=4, alpha=8, attach="sequential"), ["q_proj", "v_proj"]),
    # no bias: the key part of c_attn's bias has an identically zero gradient (softmax ignores a shift),
    # and AdamW turns the rounding noise of a zero into full-size steps on both sides alike
    "linear-sequential-conv1d": ("gpt2", Linear(attach="sequential"), ["c_attn"]),
    "houlsby-llama": ("llama", Houlsby(hidden=8), None),
    "houlsby-gpt2-relu": ("gpt2", Houlsby(hidden=8, activation="relu"), None),
    "houlsby-parallel": ("llama", Houlsby(hidden=8, attach="parallel"), ["v_proj"]),
    "adalink": ("llama", AdaLink(r=4), None),
    "adalink-token-types": ("llama", AdaLink(r=4, token_types=((48, 96),)), None),
    "coda-r1": ("llama", CoDA(hidden=8, reduction=1), None),
    "coda-r3-gpt2": ("gpt2", CoDA(hidden=8, reduction=3), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kind_equals_backprop_of_the_same_adapter(case):
    family, spec, targets = CASES[case]
    model = tiny(family)
    trainer = Trainer(model, [JobSpec("j", spec, AdamW(lr=1e-2), target_modules=targets)])
    ref = BackpropReference(model, trainer, "j", lr=1e-2)
    for b in batch_stream(96, 3, 10, seed=2, steps=6):
        trainer.step({"j": b})
        ref.step([b])
    trainer.flush()
    err = _max_err(trainer, "j", ref)
    assert err <= TOL, (case, err)
    for site, a in trainer.adapters("j").items():  # the server's copy is the device's
        for (n, p), q in zip(a.named_parameters(), trainer.host.jobs["j"].adapters[site].parameters()):
            assert torch.equal(p.detach(), q), (site, n)


def test_sequential_and_parallel_jobs_share_a_site_in_one_batch():
    """A mixed batch: jobs adapt q_proj's input, its output, its router-selected tokens, and the embedding
    output by token type; each equals its own backprop."""
    model = tiny("llama")
    jobs = [JobSpec("par", LowRank(r=4), AdamW(lr=1e-2), target_modules=["q_proj"]),
            JobSpec("seq", Houlsby(hidden=8), AdamW(lr=1e-2), target_modules=["q_proj"], fit_interval=2),
            JobSpec("coda", CoDA(hidden=8, reduction=2), AdamW(lr=1e-2), target_modules=["q_proj"]),
            JobSpec("ada", AdaLink(r=4, token_types=((48, 96),)), AdamW(lr=1e-2))]
    trainer = Trainer(model, jobs)
    refs = {j.job_id: BackpropReference(model, trainer, j.job_id, lr=1e-2) for j in jobs}
    data = {j: batch_stream(96, 2, 9, seed=s, steps=4) for s, j in enumerate(refs)}
    for i in range(4):
        trainer.step({j: data[j][i] for j in refs})
        for j in ("par", "coda", "ada"):
            refs[j].step([data[j][i]])
        if i % 2:
            refs["seq"].step([data["seq"][i - 1], data["seq"][i]])  # I = 2: gradient accumulation
    trainer.flush()
    for j, ref in refs.items():
        assert _max_err(trainer, j, ref) <= TOL, j


def test_sequential_packet_carries_the_output_and_its_gradient():
    """The packet of a sequential site holds h (the module's output, d_out wide), not x."""
    model = tiny("llama")
    trainer = Trainer(model, [JobSpec("j", Houlsby(hidden=4), target_modules=["k_proj"])])
    site = trainer.host.jobs["j"].sites["model.layers.0.self_attn.k_proj"]
    assert (site.kind, site.in_features, site.out_features) == ("linear", 16, 16)  # k_proj: 32 -> 16
    seen = {}
    hook = model.get_submodule(site.name).register_forward_hook(lambda m, a, out: seen.update(h=out.detach()))
    batch = random_batch(96, 2, 6, seed=0, ragged=False)
    result = trainer.host.step({**batch, "jobs": ["j", "j"]})
    hook.remove()
    p = next(p for p in result.packets if p.site == site.name)
    # every token but the last of each row (whose key no labelled position reads) travels
    assert torch.equal(p.x, seen["h"][:, :-1].flatten(0, 1))
    assert p.g.shape == p.x.shape


def test_coda_packets_carry_only_the_selected_tokens():
    """k = ceil(n / reduction) tokens per row (n: the row's real tokens), chosen by the router; only they travel."""
    model = tiny("llama")
    trainer = Trainer(model, [JobSpec("j", CoDA(hidden=4, reduction=4), target_modules=["o_proj"])])
    name = "model.layers.1.self_attn.o_proj"
    adapter = trainer.host.jobs["j"].adapters[name]
    seen = {}
    hook = model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.update(h=out.detach()))
    batch = random_batch(96, 3, 12, seed=7)  # ragged: 6..12 real tokens per row
    result = trainer.host.step({**batch, "jobs": ["j"] * 3})
    hook.remove()
    sel = adapter.select(seen["h"], batch["attention_mask"])  # (B, T)
    n = batch["attention_mask"].sum(1)
    assert sel.sum(1).tolist() == [-(-int(v) // 4) for v in n]  # ceil(n / 4) per row
    assert not sel[batch["attention_mask"] == 0].any()  # never padding
    p = next(p for p in result.packets if p.site == name)
    last = torch.nn.functional.one_hot(n - 1, 12).bool()  # a row's last real token: no label depends on it
    assert torch.equal(p.x, seen["h"][sel & ~last])  # the selected tokens, nothing else
    assert p.x.shape[0] < 0.4 * int(batch["attention_mask"].sum())
    with pytest.raises(ValueError, match="`reduction`"):
        CoDA(reduction=0)
    with pytest.raises(ValueError, match="`attach` of a coda"):
        CoDA(attach="parallel")


def test_sequential_lowrank_has_no_peft_form(tmp_path):
    from colaflow.export import save_peft

    trainer = Trainer(tiny("llama"), [JobSpec("a", LowRank(r=2, attach="sequential"))])
    with pytest.raises(ValueError, match="no PEFT form"):
        save_peft(trainer.adapters("a"), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_bad_specs_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="`attach`"):
        LowRank(attach="serial")
    with pytest.raises(ValueError, match="`hidden`"):
        Houlsby(hidden=0)
    with pytest.raises(ValueError, match="`activation`"):
        Houlsby(activation="swish")
    with pytest.raises(ValueError, match="`attach` of an adalink"):
        AdaLink(attach="parallel")
    with pytest.raises(ValueError, match="overlap"):
        AdaLink(token_types=((0, 10), (5, 20)))
    with pytest.raises(ValueError, match="`token_types`"):
        AdaLink(token_types=((10, 5),))
    with pytest.raises(ValueError, match="must be an embedding"):
        Trainer(tiny("llama"), [JobSpec("j", AdaLink(token_types=((1, 2),)), target_modules=["q_proj"])])
    with pytest.raises(ValueError, match="parallel houlsby"):
        Trainer(tiny("llama"), [JobSpec("j", Houlsby(attach="parallel"), target_modules=["embed_tokens"])])
    # specs travel as maps: the wire form round-trips, ranges included
    spec = AdaLink(r=2, token_types=[[3, 7], [9, 12]])
    assert AdapterSpec.from_dict(spec.to_dict()) == spec == AdaLink(r=2, token_types=((3, 7), (9, 12)))
    assert not LowRank(attach="sequential").mergeable and LowRank().mergeable


def test_token_types_travel_as_one_byte_per_token_and_bad_routes_are_refused():
    model = tiny("llama")
    spec = AdaLink(r=4, token_types=((48, 96),))
    trainer = Trainer(model, [JobSpec("j", spec)])
    batch = batch_stream(96, 2, 8, seed=3, steps=1)[0]
    result = trainer.host.step({**batch, "jobs": ["j", "j"]})
    (p,) = result.packets
    assert p.route is not None and p.route.dtype == torch.uint8 and p.route.shape == (p.x.shape[0],)
    assert set(p.route.tolist()) == {0, 1}
    back = serde.packets_from_proto(*serde.packets_to_proto(Packets("j", p.step, [p]), "bf16", "bf16")).packets[0]
    assert torch.equal(back.route, p.route)  # routes travel raw whatever the codec
    site = trainer.host.jobs["j"].sites[p.site]
    check_packet(back, site, spec.routes)
    bad = [(Packet(p.job, p.site, p.step, p.version, p.x, p.g, None), "has no `route`"),
           (Packet(p.job, p.site, p.step, p.version, p.x, p.g, p.route.clone().fill_(2)), "token type 2"),
           (Packet(p.job, p.site, p.step, p.version, p.x, p.g, p.route[1:]), "must be"),
           (Packet(p.job, p.site, p.step, p.version, p.x, p.g, p.route.long()), "uint8")]
    for packet, match in bad:
        with pytest.raises(ValueError, match=match):
            check_packet(packet, site, spec.routes)
    with pytest.raises(ValueError, match="routes no token types"):
        check_packet(p, site, 0)


@pytest.mark.parametrize("spec", [Houlsby(hidden=8), AdaLink(r=4, token_types=((48, 96),))], ids=["houlsby", "adalink"])
def test_native_export_loads_back_for_generate(tmp_path, spec):
    """export -> load -> attached(model): the same logits as the trained host, and `generate` runs with them."""
    from colaflow.export import attached, load, save, save_peft

    model = tiny("llama")
    job = JobSpec("a", spec, AdamW(lr=3e-2))
    trainer = Trainer(model, [job])
    for b in batch_stream(96, 2, 8, seed=4, steps=4):
        trainer.step({"a": b})
    trainer.flush()
    save(trainer.adapters("a"), job, tmp_path / "native")
    spec2, adapters = load(tmp_path / "native")
    assert spec2 == job
    ids = torch.tensor([[5, 50, 7, 60, 9, 3], [70, 2, 81, 4, 90, 11]])
    fresh = copy.deepcopy(model)  # a model that never saw the host: as a user would load it
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
        with trainer.host.using("a"):
            want = model(input_ids=ids).logits
            want_gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        with attached(fresh, spec2, adapters):
            got = fresh(input_ids=ids).logits
            got_gen = fresh.generate(ids, max_new_tokens=5, do_sample=False)
        after = fresh(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapters do something
    assert torch.equal(got, want)
    assert torch.equal(got_gen, want_gen) and got_gen.shape == (2, 11)
    assert torch.equal(after, plain)  # nothing stays behind
    with pytest.raises(ValueError, match="PEFT export needs lowrank"):
        save_peft(trainer.adapters("a"), tmp_path / "peft")
    with pytest.raises(ValueError, match="does not fit this model"):
        with attached(tiny("llama", hidden=64), spec2, adapters):
            pass


def test_kinds_train_over_grpc_as_in_process(tmp_path):
    """A real server and edge daemon on loopback: Houlsby, AdaLink with token types (routes on the wire),
    a sequential low-rank adapter and CoDA (selected tokens only) train bit for bit as in-process."""
    from test_transport import exported, max_err, reference

    from colaflow.wire.client import Client
    from procs import examples, start_edge, start_server, stop, wait_done, wait_workers

    server, address = start_server(tmp_path)
    edge = start_edge(tmp_path, address, "a")
    client = Client(address)
    try:
        wait_workers(client, 1)
        ex = examples(96, 16, seed=5)
        specs = [JobSpec("houlsby", Houlsby(hidden=8), AdamW(lr=1e-2)),
                 JobSpec("adalink", AdaLink(r=4, token_types=((48, 96),)), AdamW(lr=1e-2)),
                 JobSpec("seq-lora", LowRank(r=4, attach="sequential"), AdamW(lr=1e-2), fit_interval=2),
                 JobSpec("coda", CoDA(hidden=8, reduction=2), AdamW(lr=1e-2), staleness=1)]
        for spec in specs:
            client.submit(spec, ex, steps=6, batch_size=4)
        for spec in specs:
            assert wait_done(client, spec.job_id).state == "done"
            got, want = exported(client, spec.job_id, tmp_path), reference(spec, ex, 6)
            assert set(got) == set(want) and max_err(got, want) == 0.0, spec.job_id
    finally:
        client.close()
        stop(server, edge)
