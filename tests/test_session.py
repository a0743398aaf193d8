"""The orchestration API: one job, bit-identical adapters in process and against a server with two
edge daemons; colaflow's own errors, each saying what to do next."""
from __future__ import annotations

import time

import pytest
import torch

from colaflow import AdamW, LowRank, Session
from colaflow.errors import InvalidArgument, JobFailed, NotFound, NoWorkers, Unauthenticated
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
    last = job.metrics()[-1]  # the wire, counted: packets out, updates (with learner state) back
    assert last["fits"] > 0 and last["bytes_sent"] > 100_000 and last["bytes_received"] > 10_000
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
        session.submit(examples(96, 4, seed=0), steps=2, batch_size=4, targets=["nope_proj"])
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


def test_in_process_failures_are_colaflows_own_too(tmp_path):
    with Session("tiny-llama") as session:
        with pytest.raises(InvalidArgument, match="`steps` must be an int"):
            session.submit(examples(96, 8, seed=0), job_id="leak", steps=0, batch_size=4)
        with pytest.raises(InvalidArgument, match="row 0: `input_ids` must be a list of token ids, got str"):
            session.submit([{"input_ids": "abc"}], steps=2, batch_size=1)
        with pytest.raises(InvalidArgument, match="`batch_size` 8 is larger than the 4 examples"):
            session.submit(examples(96, 4, seed=0), job_id="leak", steps=2, batch_size=8)
        job = session.submit(examples(96, 8, seed=0), job_id="leak", steps=2, batch_size=4)  # nothing leaked
        assert job.wait(timeout=60)["state"] == "done"
        a, b = (session.submit(examples(96, 8, seed=0), steps=1, batch_size=4) for _ in range(2))
        assert a.id != b.id  # default ids do not collide within a second
        bad = examples(96, 8, seed=0)
        bad[3]["input_ids"][0] = 10_000  # beyond the vocabulary: refused at submit, as a server does
        with pytest.raises(InvalidArgument,
                           match=r"`data.examples\[3\]` holds token id 10000; the model's vocabulary is 0..95"):
            session.submit(bad, steps=3, batch_size=8)
        unlabelled = [e | {"labels": [-100] * len(e["labels"])} for e in examples(96, 8, seed=0)]
        job = session.submit(unlabelled, steps=3, batch_size=8)
        with pytest.raises(JobFailed, match="ended failed: step 0 failed: ValueError: .* carry no labelled token"):
            job.wait(timeout=60)
        assert job.status()["state"] == "failed"
    session.close()  # a second close does nothing


def test_a_job_whose_workers_all_die_says_so(tmp_path):
    import signal

    server, address = start_server(tmp_path)
    edge = start_edge(tmp_path, address, "only")
    try:
        with Session(address=address, connect_timeout=2.0) as session:
            wait_workers(session._backend.client, 1)
            job = session.submit(examples(96, 8, seed=0), steps=100_000, batch_size=4)
            while job.status()["step"] < 2:
                time.sleep(0.05)
            edge.send_signal(signal.SIGKILL)
            with pytest.raises(NoWorkers, match="no workers connected for 2 s"):
                job.wait(timeout=60)
    finally:
        stop(edge, server)


def test_ctrl_c_while_waiting_says_what_became_of_the_job(monkeypatch):
    with Session("tiny-llama") as session:
        job = session.submit(examples(96, 8, seed=0), steps=2, batch_size=4)

        def interrupted(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(session._backend, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt, match=f"job {job.id}: it pauses here until the next wait\\(\\); "
                                                    "job.cancel\\(\\) ends it"):
            job.wait()


def test_wait_prints_a_progress_line_where_no_bar_can_be_drawn(capsys, monkeypatch, served):
    """stderr is no terminal here (captured, as in a script's log or CI): plain lines on stdout, every
    PROGRESS_EVERY_S seconds (0 here: one per change) and one at the end; none with progress=False."""
    import colaflow.progress

    monkeypatch.setattr(colaflow.progress, "PROGRESS_EVERY_S", 0.0)
    with Session("tiny-llama") as session:
        job, status = train(session, "lines")
    out = capsys.readouterr().out
    assert status["state"] == "done"
    assert "job lines: step 1/10, loss " in out and "steps/s" in out
    assert out.strip().splitlines()[-1].startswith("job lines: step 10/10, loss ")
    session, _ = served  # a server's job: watched, not driven; the same lines
    job, status = train(session, "remote-lines")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("job remote-lines: step 10/10, loss ")
    with Session("tiny-llama") as session:
        job = session.submit(examples(96, 8, seed=0), steps=2, batch_size=4)
        job.wait(progress=False)
    assert capsys.readouterr().out == ""
