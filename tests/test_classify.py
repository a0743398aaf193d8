"""Sequence-classification jobs: the head trains as a site, exactly as backprop trains it, in-process
and over gRPC; the server holds no parameter gradient."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

from colaflow import AdamW, JobSpec, LowRank, Trainer, WithHead, classification_job, classifier
from colaflow.adapters.base import AdapterSpec
from colaflow.adapters.linear import Linear
from colaflow.data.batches import from_map, to_map
from colaflow.engine.loss import seq_cls
from colaflow.models import tiny

TOL = 1e-5
CLASSES = 3


def cls_examples(n: int, seed: int, vocab: int = 96) -> list[dict]:
    """Token rows of ragged length whose class is a function of their tokens (so there is signal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g)
        out.append({"input_ids": ids.tolist(), "label": int(ids[0]) % CLASSES})
    return out


class Backprop:
    """Ordinary backprop: the same adapters (from the same start) hooked onto a copy of the model."""

    def __init__(self, model, start: dict, lr: float, weight_decay: float):
        self.model = copy.deepcopy(model)
        self.adapters = {s: copy.deepcopy(a).requires_grad_(True) for s, a in start.items()}
        for site, adapter in self.adapters.items():
            self.model.get_submodule(site).register_forward_hook(
                lambda mod, args, out, a=adapter: out + a(args[0]))
        params = [p for a in self.adapters.values() for p in a.parameters()]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(self, batch: dict) -> None:
        self.opt.zero_grad()
        rs, rc = seq_cls(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
        (rs.sum() / rc.sum()).backward()
        self.opt.step()


@pytest.mark.parametrize("family,probe", [("llama", False), ("bert", False), ("llama", True)])
def test_classification_trajectory_equals_backprop(family, probe):
    """Head + lowrank body (or the head alone: a linear probe) over last-token (decoder) or mean
    (encoder) pooling follow backprop's trajectory; the server's model never changes."""
    model = classifier(tiny(family), CLASSES)
    assert model.pooling == ("last" if family == "llama" else "mean")
    w0 = model.score.weight.clone()
    spec = classification_job("j", model, LowRank(r=4, alpha=8), probe=probe,
                               optimizer=AdamW(lr=1e-2, weight_decay=0.01))
    trainer = Trainer(model, [spec], loss_fn=seq_cls)
    sites = list(trainer.adapters("j"))
    assert sites[-1] == "score" and (len(sites) == 1) == probe
    assert isinstance(trainer.adapters("j")["score"].spec, Linear)  # the head's own kind, biased
    ref = Backprop(model, trainer.adapters("j"), lr=1e-2, weight_decay=0.01)
    data = from_map(to_map(cls_examples(40, seed=1), batch_size=6))
    for _ in range(12):
        batch = next(data)
        trainer.step({"j": batch})
        ref.step(batch)
        assert all(p.grad is None for p in model.parameters())  # no parameter gradient on the server
    trainer.flush()
    errs = []
    for site, adapter in trainer.adapters("j").items():
        for name, p in adapter.named_parameters():
            want = dict(ref.adapters[site].named_parameters())[name].detach()
            assert want.abs().max() > 0, f"{site}.{name} did not train"
            errs.append(rel_err(p.detach(), want))
    assert max(errs) <= TOL, max(errs)
    assert torch.equal(model.score.weight, w0)  # W0 frozen: the job's head is W0 + dW


def test_with_head_spec_round_trips_and_refuses_bad_input():
    spec = WithHead(body=LowRank(r=2), head_sites=["score", "classifier"])
    back = AdapterSpec.from_dict(spec.to_dict())
    assert back == spec and back.head == Linear(bias=True)
    assert spec.for_site("x.score") == Linear(bias=True) and spec.for_site("layers.0.q_proj") == LowRank(r=2)
    job = JobSpec.from_dict(classification_job("j", classifier(tiny("llama"), 3), LowRank(r=2)).to_dict())
    assert job.target_modules == ["q_proj", "v_proj", "score"] and isinstance(job.adapter, WithHead)
    with pytest.raises(ValueError, match="head_sites"):
        WithHead(head_sites=())
    with pytest.raises(ValueError, match="`body`"):
        WithHead(body=WithHead())
    with pytest.raises(ValueError, match="`pooling`"):
        classifier(tiny("llama"), 3, pooling="max")


def test_bad_classification_labels_are_refused():
    with pytest.raises(ValueError, match=r"example 1: `label` must be a class id"):
        to_map([{"input_ids": [1, 2], "label": 0}, {"input_ids": [1, 2], "label": -1}])
    with pytest.raises(ValueError, match=r"examples\[1\].*either `label`"):
        list(next(from_map({"examples": [{"input_ids": [1, 2], "label": 0}, {"input_ids": [1, 2]}]})))
    model = classifier(tiny("llama"), CLASSES)
    trainer = Trainer(model, [classification_job("j", model)], loss_fn=seq_cls)
    batch = next(from_map(to_map([{"input_ids": [1, 2, 3], "label": 7}] * 2, batch_size=2)))
    with pytest.raises(ValueError, match=r"class id 7; the model has classes 0..2"):
        trainer.step({"j": batch})


def test_classification_job_over_grpc_equals_in_process(tmp_path):
    """`colaflow serve --classes` (a real server process holding the classifier) and a real edge daemon
    process: the exported head and body adapters equal the in-process run bit for bit."""
    from colaflow.export import load
    from colaflow.local import start_edge, start_server, stop
    from colaflow.wire.client import Client
    from procs import wait_done, wait_workers

    steps, ex = 8, cls_examples(24, seed=3)
    spec = classification_job("cls", classifier(tiny("llama"), CLASSES), LowRank(r=4), optimizer=AdamW(lr=1e-2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server below computes on one thread: so does the reference
    try:
        trainer = Trainer(classifier(tiny("llama"), CLASSES), [spec], loss_fn=seq_cls)
        data = from_map(to_map(ex, batch_size=4))
        for _ in range(steps):
            trainer.step({"cls": next(data)})
        trainer.flush()
    finally:
        torch.set_num_threads(threads)
    server, address = start_server(tmp_path, "--classes", str(CLASSES), "--http-port", "off")
    edge = start_edge(tmp_path, address, "a")
    client = Client(address)
    try:
        wait_workers(client, 1)
        client.submit(spec, ex, steps=steps, batch_size=4)
        status = wait_done(client, "cls")
        assert status.state == "done", status
        got_spec, got = load(client.export("cls", tmp_path / "export"))
    finally:
        client.close()
        stop(edge, server)
    assert got_spec == spec
    want = trainer.adapters("cls")
    assert set(got) == set(want) and "score" in got
    for site, adapter in want.items():
        for name, p in adapter.named_parameters():
            assert torch.equal(dict(got[site].named_parameters())[name], p.detach()), (site, name)


def test_a_session_trains_a_classification_job_and_exports_its_head(tmp_path):
    """The user-facing path in one process: `label` examples, `seq_cls`, a native export with the head."""
    from colaflow import Session
    from colaflow.export import load

    model = classifier(tiny("bert"), CLASSES)
    with Session(model, loss="seq_cls") as session:
        job = session.submit(cls_examples(16, seed=5), steps=4, adapter=WithHead(LowRank(r=2)),
                             targets=["query", "value", "score"], batch_size=4)
        assert job.wait(progress=False)["state"] == "done"
        spec, adapters = load(job.export(tmp_path / "export", format="native"))
    assert isinstance(spec.adapter, WithHead) and len(adapters) == 5
    head = adapters["score"]
    assert isinstance(head.spec, Linear) and head.weight.shape == (CLASSES, 32) and head.bias.abs().max() > 0


def test_a_plain_job_on_a_classifier_trains_the_head_too():
    """A job submitted as for any model (a plain adapter, default or listed targets) trains the head as
    `classification_job` would: the same sites, kinds and adapters, bit for bit (before, the head was
    left untrained: a server started with --classes learnt only its body)."""
    model = classifier(tiny("llama"), CLASSES)
    batches = from_map(to_map(cls_examples(24, seed=3), batch_size=4))
    kw = dict(optimizer=AdamW(lr=1e-2))
    for targets in (None, ["q_proj"]):
        plain = JobSpec("plain", LowRank(r=2), target_modules=targets, **kw)
        made = classification_job("made", model, LowRank(r=2), targets=targets, **kw)
        trainer = Trainer(model, [plain, made], loss_fn=seq_cls)
        for _ in range(3):
            b = next(batches)
            trainer.step({"plain": b, "made": b})
        a, b = trainer.adapters("plain"), trainer.adapters("made")
        assert list(a) == list(b) and any(s.endswith("score") for s in a)
        assert isinstance(a[next(s for s in a if s.endswith("score"))],
                          type(b[next(s for s in b if s.endswith("score"))]))
        assert all(torch.equal(p, q) for s in a for p, q in zip(a[s].parameters(), b[s].parameters()))
    from colaflow.export import save_peft

    with pytest.raises(ValueError, match="score has linear adapters.*format='native'"):
        save_peft(a, "unused")
