"""Black-box output mode: the server runs a forward only; the device's small LM learns on top of it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_stream, rel_err

from colaflow import AdamW, BlackBoxHost, JobSpec, LowRank, SmallLM, Trainer
from colaflow.adapters.base import build_adapter
from colaflow.adapters.topk import OUTPUT, model_logprobs
from colaflow.control.protocol import Packets
from colaflow.data.batches import IGNORE, collate
from colaflow.engine.host import Host
from colaflow.learn.fit import site_seed
from colaflow.learn.learner import Learner
from colaflow.learn.messages import Packet
from colaflow.models import tiny
from colaflow.wire import serde

VOCAB, ROWS, LEN, STEPS = 96, 4, 12, 5


def _reference(model, spec: JobSpec, data: list[dict], fit_interval: int = 1) -> dict[str, torch.Tensor]:
    """The same small model trained by ordinary backprop on the combined loss, written out here from
    the base model's logits (its own top-k and tail, not colaflow.engine.blackbox's code)."""
    site = Trainer(model, [spec]).host.jobs[spec.job_id].sites[OUTPUT]
    small = build_adapter(spec.adapter, site, seed=site_seed(spec, site))
    opt, sched = spec.optimizer.build(small.parameters())
    k = spec.adapter.top_k
    opt.zero_grad()
    for i, b in enumerate(data):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
        if k:  # top-k keep their log-probs; the rest of the mass spread evenly over the other V - k tokens
            vals, idx = lp.topk(k, -1)
            tail = torch.log1p(-vals.double().exp().sum(-1)).float() - math.log(VOCAB - k)  # (B, T)
            lp = tail.unsqueeze(-1).expand_as(lp).scatter(-1, idx, vals)
        labels = F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T)
        live = labels != IGNORE
        loss = F.cross_entropy(lp[live] + small(b["input_ids"])[live], labels[live])
        loss.backward()
        if (i + 1) % fit_interval == 0:
            opt.step()
            sched.step()
            opt.zero_grad()
    return {n: p.detach() for n, p in small.named_parameters()}


def _run(host_or_model, spec: JobSpec, data: list[dict]) -> dict[str, torch.Tensor]:
    trainer = Trainer(host_or_model, [spec])
    for b in data:
        trainer.step({spec.job_id: b})
    return {n: p.detach() for n, p in trainer.adapters(spec.job_id)[OUTPUT].named_parameters()}


def _max_err(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(rel_err(got[n], want[n]) for n in want)


@pytest.mark.parametrize("top_k,gate,interval", [(8, True, 1), (8, False, 2), (0, False, 1)])
def test_trajectory_equals_backprop_of_the_combined_loss(top_k, gate, interval):
    """Through host, scheduler and worker, the small model follows ordinary backprop of the combined
    loss with the same representation (top-k + uniform tail; k = 0: the exact full log-probs)."""
    model = tiny("llama", vocab=VOCAB)
    spec = JobSpec("bb", SmallLM(top_k=top_k, hidden=16, gate=gate), AdamW(lr=1e-2), fit_interval=interval)
    data = batch_stream(VOCAB, ROWS, LEN, seed=1, steps=STEPS * interval)
    got, want = _run(model, spec, data), _reference(model, spec, data, interval)
    assert float(got["head.weight"].abs().max()) > 1e-3  # it moved
    err = _max_err(got, want)
    print(f"top_k={top_k} gate={gate} I={interval}: max relative error {err:.2e}")
    assert err <= 1e-5


def test_top_k_differs_from_exact_and_converges_to_it():
    """The representation matters (k = 8 is not exact), and k = V - 1 is exact up to the tail's rounding."""
    model = tiny("llama", vocab=VOCAB)
    data = batch_stream(VOCAB, ROWS, LEN, seed=2, steps=3)
    runs = {k: _run(model, JobSpec("bb", SmallLM(top_k=k, hidden=16), AdamW(lr=1e-2)), data) for k in (0, 8, VOCAB - 1)}
    assert _max_err(runs[8], runs[0]) > 1e-3
    assert _max_err(runs[VOCAB - 1], runs[0]) < 1e-3


def test_server_forward_builds_no_autograd_graph():
    """Every module of the base model runs with grad disabled and returns no grad-requiring tensor."""
    model = tiny("llama", vocab=VOCAB)
    host = Host(model)
    host.add_job(JobSpec("bb", SmallLM(top_k=8)))
    seen = []

    def check(module, args, out):
        assert not torch.is_grad_enabled(), f"{type(module).__name__} ran with grad enabled"
        tensors = [out] if torch.is_tensor(out) else [v for v in (out.values() if isinstance(out, dict) else out)
                                                        if torch.is_tensor(v)] if isinstance(out, (dict, tuple)) else []
        assert not any(t.requires_grad for t in tensors), f"{type(module).__name__} built a graph"
        seen.append(module)
    handles = [m.register_forward_hook(check) for m in model.modules()]
    result = host.step(collate([("bb", batch_stream(VOCAB, ROWS, LEN, seed=3, steps=1)[0])]))
    for h in handles:
        h.remove()
    assert len(seen) >= len(list(model.modules())) - 1  # every module ran (the rotary cache may not)
    assert all(p.grad is None for p in model.parameters())
    (p,) = result.packets
    assert (p.site, p.x.dtype, tuple(p.x.shape),
            tuple(p.g.shape)) == (OUTPUT, torch.int32, (ROWS, LEN, 10), (ROWS, LEN, 9))
    assert not p.g.requires_grad


class _Api:
    """An API-style model: log-probs out, nothing else. No parameters, no module, no gradients."""

    def __init__(self, model):
        fn = model_logprobs(model)
        self.calls = 0

        def logprobs(ids, mask, k):
            self.calls += 1
            values, indices = fn(ids, mask, k)
            return values.clone(), indices.clone()
        self.logprobs = logprobs


def test_a_host_without_a_model_serves_black_box_jobs():
    """A BlackBoxHost built from a `logprobs` callable trains exactly as a Host over the torch model."""
    model = tiny("llama", vocab=VOCAB)
    api = _Api(model)
    host = BlackBoxHost(api.logprobs, vocab_size=VOCAB)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(host).values())
    spec = JobSpec("api", SmallLM(top_k=4, hidden=16, gate=True), AdamW(lr=1e-2))
    data = batch_stream(VOCAB, ROWS, LEN, seed=4, steps=STEPS)
    got = _run(host, spec, data)
    assert api.calls == STEPS
    assert _max_err(got, _run(model, spec, data)) == 0.0
    with pytest.raises(ValueError, match="needs a torch model"):
        host.add_job(JobSpec("cola", LowRank()))


def test_bytes_per_token_do_not_scale_with_the_vocabulary():
    """Top-k packets on the wire cost 8k + 12 bytes per token at V = 96 and V = 4096; exact ones grow with V."""
    per_token = {}
    for vocab in (96, 4096):
        model = tiny("llama", vocab=vocab)
        batch = batch_stream(vocab, ROWS, LEN, seed=5, steps=1)[0]
        for k in (8, 0):
            host = Host(model)
            host.add_job(JobSpec("bb", SmallLM(top_k=k)))
            (p,) = host.step(collate([("bb", batch)])).packets
            frame, parts = serde.packets_to_proto(Packets("bb", 0, [p]))
            per_token[(vocab, k)] = sum(len(b) for b in parts) / (ROWS * LEN)
    print(per_token)
    assert per_token[(96, 8)] == per_token[(4096, 8)] == 8 * 8 + 12
    assert per_token[(4096, 0)] > 10 * per_token[(96, 0)]


def test_bad_black_box_input_is_refused():
    model = tiny("llama", vocab=VOCAB)
    with pytest.raises(ValueError, match="`top_k` must be in"):
        Host(model).add_job(JobSpec("bb", SmallLM(top_k=VOCAB)))
    with pytest.raises(ValueError, match="`hidden` must be an int"):
        SmallLM(hidden=0)
    host = Host(model)
    host.add_job(JobSpec("bb", SmallLM(top_k=4)))
    host.add_job(JobSpec("cola", LowRank(r=2)))
    b = batch_stream(VOCAB, 2, LEN, seed=6, steps=1)[0]
    with pytest.raises(ValueError, match="black-box jobs step alone"):
        host.step(collate([("bb", b), ("cola", b)]))
    (p,) = host.step(collate([("bb", b)])).packets
    spec = host.jobs["bb"].spec
    learner = Learner(spec, host.jobs["bb"].sites[OUTPUT])
    before = {n: t.clone() for n, t in learner.adapter.named_parameters()}
    x = p.x.clone()
    x[0, 0, 2] = VOCAB + 5  # a top-k index outside the vocabulary
    with pytest.raises(ValueError, match="outside the vocabulary"):
        learner.consume(Packet("bb", OUTPUT, 0, 0, x, p.g))
    assert all(torch.equal(before[n], t) for n, t in learner.adapter.named_parameters())  # nothing absorbed
    with pytest.raises(ValueError, match="expected last dim 5"):
        learner.consume(Packet("bb", OUTPUT, 0, 0, p.x, p.g[..., :3]))
    assert Learner(spec, host.jobs["bb"].sites[OUTPUT]).consume(p) is not None  # the good packet fits


def _combined_loss(model, small, examples: list[dict]) -> float:
    """Mean cross-entropy of the combination (large model + small model) on the examples' labels."""
    from colaflow.adapters.smalllm import combined_logprobs

    total, count = 0.0, 0
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        lp = combined_logprobs(small, model_logprobs(model), ids)  # (1, T, V)
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        total += float(F.cross_entropy(lp.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
    return total / count


def test_trains_over_grpc(tmp_path):
    """A black-box job on a real server and edge daemon (separate processes, loopback gRPC): the same
    scheduler, worker and wire as ColA; the small model equals the in-process run's, and the loss falls."""
    from colaflow.data.batches import from_map
    from colaflow.export import load
    from colaflow.wire.client import Client
    from procs import examples, start_edge, start_server, stop, wait_done, wait_workers

    steps, ex = 16, examples(VOCAB, 24, seed=0)
    spec = JobSpec("bb-grpc", SmallLM(top_k=8, hidden=32), AdamW(lr=3e-2), staleness=1)
    server, address = start_server(tmp_path)
    edge = start_edge(tmp_path, address, "a")
    client = Client(address)
    try:
        wait_workers(client, 1)
        client.submit(spec, ex, steps=steps, batch_size=4)
        status = wait_done(client, spec.job_id)
        assert status.state == "done", status
        _, adapters = load(client.export(spec.job_id, tmp_path / "export"))
    finally:
        client.close()
        stop(server, edge)
    small = adapters[OUTPUT]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker process runs: then equal bit for bit
    try:
        trainer = Trainer(tiny("llama"), [spec])
        data = from_map({"examples": ex, "batch_size": 4, "seed": 0})
        for _ in range(steps):
            trainer.step({spec.job_id: next(data)})
    finally:
        torch.set_num_threads(threads)
    want = {n: p.detach() for n, p in trainer.adapters(spec.job_id)[OUTPUT].named_parameters()}
    assert _max_err({n: p.detach() for n, p in small.named_parameters()}, want) == 0.0
    model = tiny("llama")
    fresh = build_adapter(spec.adapter, small.site, seed=0)
    before, after = _combined_loss(model, fresh, ex), _combined_loss(model, small, ex)
    print(f"combined loss on the training examples: {before:.3f} -> {after:.3f}")
    assert after < before - 0.1


def test_staleness_costs_nothing_in_black_box_mode():
    """The server's forward never reads the small model, so any `S` gives the same packets and the same
    trajectory as `S = 0` (pipelining is free here, unlike ColA)."""
    model = tiny("llama", vocab=VOCAB)
    data = batch_stream(VOCAB, ROWS, LEN, seed=7, steps=STEPS)
    runs = [_run(model, JobSpec("bb", SmallLM(top_k=8, hidden=16), AdamW(lr=1e-2), staleness=s), data) for s in (0, 3)]
    assert _max_err(runs[1], runs[0]) == 0.0


def test_generate_with_the_combination():
    """`generate` decodes greedily from large + small; with a fresh small model it is the large model's
    own greedy decoding, and a small model that learned a bias changes it."""
    from colaflow.adapters.smalllm import generate

    model = tiny("llama", vocab=VOCAB)
    host = Host(model)
    (site,) = host.add_job(JobSpec("bb", SmallLM(top_k=8, hidden=16)))
    small = build_adapter(SmallLM(top_k=8, hidden=16), site, seed=0)
    prompt = torch.tensor([[5, 17, 42, 9]])
    plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(generate(model, small, prompt, max_new_tokens=6), plain)
    with torch.no_grad():
        small.head.bias[33] = 100.0  # the small model insists on token 33
    out = generate(model_logprobs(model), small, prompt, max_new_tokens=3)
    assert out[0, 4:].tolist() == [33, 33, 33]
