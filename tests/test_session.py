"""The orchestration API: one job, bit-identical adapters in process and against a server with two
edge daemons; colaflow's own errors, each saying what to do next."""
from __future__ import annotations

import pytest
import torch

from colaflow import AdamW, LowRank, Session
from colaflow.errors import InvalidArgument, JobFailed, NoWorkers, NotFound, Unauthenticated
from colaflow.export import load
from procs import examples, start_edge, start_server, stop, wait_workers

STEPS = 10


def train(session: Session, job_id: str = "api", **kw):
    job = session.submit(examples(96, 16, seed=3), job_id=job_id, steps=STEPS, batch_size=4,
                         adapter=LowRank(r=4), optimizer=AdamW(lr=1e-2), targets=["q_proj", "v_proj"],
                         staleness=1, fit_interval=2, **kw)
    return job, job.wait(timeout=120)


def adapters_of(job, tmp_path) -> dict:
    _, adapters = load(job.export(tmp_path / f"{job.id}-native", format="native"))
    return {s: {n: p.detach() for n, p in a.named_parameters()} for s, a in adapters.items()}


def in_process(tmp_path) -> dict:
    """The reference: the same job in this process, on one thread as the test server and daemons run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Session("tiny-llama") as session:
            job, status = train(session)
            assert status["state"] == "done" and status["step"] == STEPS
            assert len(job.metrics()) == STEPS and all("loss" in m for m in job.metrics())
            return adapters_of(job, tmp_path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def served(tmp_path):
    server, address = start_server(tmp_path)
    edges = [start_edge(tmp_path, address, n) for n in ("a", "b")]
    with Session(address=address) as session:
        wait_workers(session._backend.client, 2)
        yield session, address
    stop(*edges, server)


def test_one_job_gives_the_same_adapters_in_process_and_over_grpc(served, tmp_path):
    session, _ = served
    job, status = train(session)
    assert status["state"] == "done" and status["max_staleness"] <= 1
    want, got = in_process(tmp_path / "local"), adapters_of(job, tmp_path)
    assert set(got) == set(want)
    for site in want:
        for name in want[site]:
            assert torch.equal(got[site][name], want[site][name]), (site, name)
    assert [j.id for j in session.jobs()] == ["api"]
    peft_dir = job.export(tmp_path / "peft")
    assert (peft_dir / "adapter_config.json").exists() and (peft_dir / "adapter_model.safetensors").exists()


def test_errors_are_colaflows_own_and_say_what_to_do(served, tmp_path):
    session, address = served
    with pytest.raises(NotFound, match="unknown job 'nope'"):
        session.job("nope")
    with pytest.raises(InvalidArgument, match="must be HOST:PORT"):
        Session(address="127.0.0.1")
    with pytest.raises(InvalidArgument, match="`target_modules` entry 'nope_proj' matches no module; near matches"):
        session.submit(examples(96, 4, seed=0), steps=2, targets=["nope_proj"])
    job = session.submit(examples(96, 8, seed=1), job_id="short", steps=200, batch_size=4)
    job.cancel()
    with pytest.raises(JobFailed, match="job short ended cancelled"):
        job.wait(timeout=30)


def test_a_job_without_workers_says_how_to_start_one(tmp_path):
    server, address = start_server(tmp_path)
    try:
        with Session(address=address, connect_timeout=1.0) as session:
            job = session.submit(examples(96, 8, seed=0), steps=3, batch_size=4)
            with pytest.raises(NoWorkers, match="start `colaflow edge --server 127.0.0.1:"):
                job.wait(timeout=30)
    finally:
        stop(server)


def test_a_wrong_token_is_refused_clearly(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{'c' * 24} control\n")
    server, address = start_server(tmp_path, "--tokens", str(tokens))
    try:
        with Session(address=address, token="x" * 24) as session:
            with pytest.raises(Unauthenticated):
                session.jobs()
    finally:
        stop(server)
