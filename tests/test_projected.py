"""Projected packets (JobSpec(packets="projected")): for a low-rank or linear adapter at staleness 0 the
server sends each site's sufficient statistics — lowrank (G B)^T X and G^T (X A^T), linear G^T X —
instead of X and G; the trajectory is the full packets' (PEFT's: tests/test_exactness.py), on every
attach and model family, mixed with full jobs, through the codecs, and through any fault schedule."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import batch_stream, random_batch, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colaflow import MLP, AdamW, CoDA, JobSpec, Linear, LowRank, Trainer
from colaflow.engine.classify import classification_job, classifier
from colaflow.engine.host import Host
from colaflow.engine.loss import seq_cls
from colaflow.models import tiny
from sim import ACTIONS, Sim, reference

TOL = 1e-5


def _final(trainer: Trainer, job: str = "j") -> dict:
    trainer.flush()
    return {s: {n: p.detach().clone() for n, p in a.named_parameters()} for s, a in trainer.adapters(job).items()}


def _err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(rel_err(got[s][n], want[s][n]) for s in want for n in want[s])


def _both(make_model, spec_kw: dict, batches: list[dict], loss_fn=None) -> tuple[dict, dict]:
    out = {}
    for packets in ("full", "projected"):
        kw = {} if loss_fn is None else {"loss_fn": loss_fn}
        trainer = Trainer(make_model(), [JobSpec("j", packets=packets, **spec_kw)], **kw)
        for b in batches:
            trainer.step({"j": b})
        out[packets] = _final(trainer)
    return out["full"], out["projected"]


@pytest.mark.parametrize("adapter", [LowRank(r=4, attach="sequential"), Linear(), Linear(bias=True),
                                     Linear(attach="sequential", bias=True), LowRank(r=4, dropout=0.2)])
def test_every_attach_and_projectable_kind_keeps_the_full_trajectory(adapter):
    torch.manual_seed(0)
    full, projected = _both(lambda: tiny("llama"), {"adapter": adapter, "optimizer": AdamW(lr=1e-2),
                                                    "target_modules": ["q_proj", "v_proj", "o_proj"]},
                            batch_stream(96, 3, 10, seed=7, steps=6))
    assert any(float(v.abs().sum()) > 0 for s in projected.values() for v in s.values())
    assert _err(projected, full) <= TOL


def test_an_encoder_classifier_with_its_head_keeps_the_full_trajectory():
    """BERT (an encoder): a LowRank body and the linear head `score`, both projected."""
    from colaflow.data.batches import stack

    def model():
        return classifier(tiny("bert"), classes=3)
    spec = classification_job("j", model(), LowRank(r=4))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 96, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g),
             "labels": torch.tensor(i % 3)} for i in range(12)]
    batches = [stack([{**r, "attention_mask": torch.ones_like(r["input_ids"])} for r in rows[i:i + 4]])
               for i in range(0, 12, 4)]
    full, projected = _both(model, {"adapter": spec.adapter, "optimizer": AdamW(lr=1e-2),
                                    "target_modules": spec.target_modules}, batches, loss_fn=seq_cls)
    assert _err(projected, full) <= TOL


def test_projected_and_full_jobs_share_a_mixed_step():
    """Two tenants in one forward, one projected, one full: each ends as it does alone."""
    specs = [JobSpec("p", LowRank(r=4), AdamW(lr=1e-2), packets="projected", seed=1),
             JobSpec("f", LowRank(r=4), AdamW(lr=1e-2), seed=2)]
    data = {j: batch_stream(96, 2, 10, seed=i, steps=5) for i, j in enumerate(("p", "f"))}
    mixed = Trainer(tiny("llama"), specs)
    for i in range(5):
        mixed.step({j: data[j][i] for j in data})
    for spec in specs:
        alone = Trainer(tiny("llama"), [spec])
        for b in data[spec.job_id]:
            alone.step({spec.job_id: b})
        assert _err(_final(mixed, spec.job_id), _final(alone, spec.job_id)) <= 1e-4  # (mixed rows round otherwise)


@pytest.mark.parametrize("codec,bound", [("bf16", 1e-2), ("int8", 3e-2)])
def test_codecs_apply_to_the_projections_within_their_bound(codec, bound):
    """The statistics travel in the job's gradient codec (`codec_g`), with its error bound."""
    from colaflow import SGD

    opt = SGD(lr=0.5, momentum=0.9)
    runs = {}
    for c in ("raw", codec):
        trainer = Trainer(tiny("llama"), [JobSpec("j", LowRank(r=4), opt, packets="projected", codec_g=c)])
        for b in batch_stream(96, 3, 10, seed=3, steps=8):
            trainer.step({"j": b})
        runs[c] = _final(trainer)
    err = _err(runs[codec], runs["raw"])
    assert 0 < err <= bound, err


def test_a_projected_packet_is_r_times_in_plus_out_numbers_whatever_the_tokens():
    host = Host(tiny("llama"))
    host.add_job(JobSpec("p", LowRank(r=4), packets="projected"))
    host.add_job(JobSpec("f", LowRank(r=4)))
    sizes = {}
    for job in ("p", "f"):
        result = host.step(random_batch(96, 8, 32, 0, ragged=False) | {"jobs": [job] * 8})
        sizes[job] = sum(t.numel() for p in result.packets
                         for t in ([*p.stats.values()] if p.stats else [p.x, p.g]))
        if job == "p":
            assert all(p.x is None and set(p.stats) == {"pa", "pb", "gsq"} for p in result.packets)
            site = host.jobs["p"].sites[result.packets[0].site]
            assert result.packets[0].stats["pa"].shape == (4, site.in_features)
    assert sizes["p"] * 20 < sizes["f"], sizes


def test_a_classifier_job_s_projected_bytes_are_its_body_s_and_head_s_statistics():
    """Admission sizes a WithHead job's projected packets per site (r (in + out) at the LowRank body, in x out
    at the linear head), not in x out everywhere: a large classifier job is not refused for memory it never takes."""
    from colaflow.engine.memory import packet_bytes

    host = Host(classifier(tiny("llama", hidden=64), classes=3), loss_fn=seq_cls)
    spec = classification_job("j", host.model, LowRank(r=4), packets="projected")
    sites = host.add_job(spec)
    want = 4 * sum(torch.Size(shape).numel() for a in host.jobs["j"].adapters.values()
                   for shape in a.stat_shapes().values())
    assert packet_bytes(sites, 1024, spec.adapter)[1] == pytest.approx(want, abs=64)  # (less gsum and gsq)


@pytest.mark.parametrize("kw,why", [
    ({"adapter": LowRank(), "staleness": 1}, "exact only at staleness 0"),
    ({"adapter": MLP()}, "lowrank or linear"),
    ({"adapter": CoDA()}, "lowrank or linear"),
    ({"adapter": LowRank(), "packets": "halved"}, "`packets` must be one of"),
])
def test_a_projection_that_would_not_be_exact_is_refused_saying_what_to_use(kw, why):
    with pytest.raises(ValueError, match=why):
        JobSpec("j", **({"packets": "projected"} | kw))


def test_a_site_whose_input_is_not_token_rows_is_refused():
    with pytest.raises(ValueError, match="serves linear and conv1d sites"):
        Host(tiny("llama")).add_job(JobSpec("j", LowRank(), target_modules=["embed_tokens"], packets="projected"))


def test_full_jobs_keep_the_spec_maps_older_peers_read():
    assert "packets" not in JobSpec("j").to_dict()
    spec = JobSpec("j", packets="projected")
    assert JobSpec.from_dict(spec.to_dict()) == spec


@settings(max_examples=max(20, int(os.environ.get("COLAFLOW_FAULT_EXAMPLES", "150")) // 3), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7)), min_size=20, max_size=100),
       interval=st.sampled_from([1, 2]), durable=st.booleans())
def test_any_schedule_of_faults_gives_the_failure_free_adapters(schedule, interval, durable):
    """Loss, duplication, crashes, lost workers and disks, server restarts: projected packets replay
    from the kept statistics, and the run ends bit for bit as without faults."""
    spec = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], fit_interval=interval,
                   packets="projected")
    sim = Sim(spec, 8, workers=2, durable=durable)
    for action, i in schedule:
        sim.act(action, i)
    got, want = sim.finish(), _reference(interval)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[s][n], want[s][n]) for s in want for n in want[s])


_REFS: dict = {}


def _reference(interval: int) -> dict:
    if interval not in _REFS:
        spec = JobSpec("j", LowRank(r=2), AdamW(lr=0.05), target_modules=["l1", "l2"], fit_interval=interval,
                       packets="projected")
        _REFS[interval] = reference(spec, 8)
    return _REFS[interval]


def test_the_metrics_grad_norm_stays_the_full_packets():
    """`grad_norm` in a step's metrics (the norm of the fit's parameter gradient) is PEFT's either way."""
    norms = {}
    for packets in ("full", "projected"):
        trainer = Trainer(tiny("llama"), [JobSpec("j", LowRank(r=4), AdamW(lr=1e-2), packets=packets)])
        for b in batch_stream(96, 3, 10, seed=5, steps=4):
            trainer.step({"j": b})
        norms[packets] = [m["grad_norm"] for m in trainer.scheduler.job("j").metrics if "grad_norm" in m]
    assert len(norms["full"]) == 3 and all(n > 0 for n in norms["full"])
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(norms["projected"], norms["full"]))


def test_a_large_full_job_hears_of_projected_packets_and_a_session_submits_them_over_grpc(monkeypatch, caplog):
    """Over a real gRPC server: an eligible job whose full packets pass the hint's size gets the advice
    in its submit answer (logged by the client) and in its events; `Session.submit(packets=...)`
    (and so a job file's `packets:`) runs a projected job to the end."""
    import logging
    import threading

    from colaflow import Session, Worker
    from colaflow.control import admission
    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.service import make_server
    from colaflow.wire.client import Client
    from colaflow.wire.link import WorkerLink
    from procs import examples

    monkeypatch.setattr(admission, "HINT_BYTES", 1)  # every eligible job is "large" here
    coordinator = Coordinator(Host(tiny("llama")))
    server, port = make_server(coordinator, Tokens(None))
    server.start()
    threading.Thread(target=coordinator.run, daemon=True).start()
    address = f"127.0.0.1:{port}"
    link = WorkerLink(address, Worker("w"))
    threading.Thread(target=link.run, daemon=True).start()
    try:
        client = Client(address)
        with caplog.at_level(logging.WARNING, logger="colaflow.client"):
            client.submit(JobSpec("big", LowRank(r=2)), examples(96, 8, 0), steps=2, batch_size=4)
            client.submit(JobSpec("mlp", MLP(hidden=4)), examples(96, 8, 0), steps=2, batch_size=4)
        said = [r.getMessage() for r in caplog.records if r.name == "colaflow.client"]
        assert len(said) == 1 and said[0].startswith("job big: its full packets are about") \
            and "packets='projected' would send" in said[0], said  # not the MLP job: it needs x and g
        assert any("packets='projected'" in e for e in coordinator.scheduler.job("big").events)
        with Session(address=address) as session:
            job = session.submit(examples(96, 8, 1), steps=3, batch_size=4, adapter=LowRank(r=2),
                                 packets="projected", job_id="proj")
            assert job.wait(timeout=120, progress=False)["state"] == "done"
        assert coordinator.scheduler.job("proj").spec.packets == "projected"
        assert not coordinator.scheduler.notes("proj")  # it already sends projected packets
        client.close()
    finally:
        link.stop()
        coordinator.stop()
        server.stop(0)
