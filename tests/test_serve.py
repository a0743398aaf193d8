"""`colaflow serve` as an operator runs it: a --device this torch cannot use is refused before the model
loads, saying what to install; SIGTERM mid-job is logged and the process exits 0, promptly."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from test_rebalance import _wait

from colaflow import AdamW, JobSpec, LowRank
from colaflow.wire.client import Client
from procs import examples, start_edge, start_server, stop, wait_workers


def test_a_cuda_device_on_a_cpu_only_torch_is_refused_before_the_model_loads():
    if torch.cuda.is_available():
        pytest.skip("this torch can use CUDA: nothing to refuse (tests/test_gpu.py serves on it)")
    out = subprocess.run([sys.executable, "-m", "colaflow.cli.main", "serve", "--model", "smollm2-135m",
                          "--device", "cuda", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--device cuda" in out.stderr and "install a CUDA build of torch" in out.stderr, out.stderr
    assert "Loading weights" not in out.stderr + out.stdout  # refused before the model loads


def test_serve_says_it_stops_on_sigterm_and_exits_cleanly_mid_job(tmp_path):
    """SIGTERM while a job runs: the server logs its shutdown, lets the step under way end (a step thread
    still computing at exit once aborted the process: status -6) and exits 0, promptly."""
    server, address = start_server(tmp_path)
    edges = [start_edge(tmp_path, address, n) for n in ("a", "b")]
    client = Client(address)
    try:
        wait_workers(client, 2)
        client.submit(JobSpec("term", LowRank(r=4), AdamW(lr=1e-2)), examples(96, 16, seed=1), steps=100_000,
                      batch_size=4)
        _wait(lambda: client.get("term").step >= 3)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        log = (tmp_path / "server.log").read_text()
        assert "colaflow serve: stopping (SIGTERM)" in log and "colaflow serve: stopped in" in log
    finally:
        client.close()
        stop(*edges, server)


def test_a_peft_export_names_the_model_as_the_operator_gave_it(tmp_path):
    """Not the server's cache path (~/.cache/colaflow/models/...), which resolves nowhere else."""
    import json

    from procs import wait_done

    server, address = start_server(tmp_path)
    edge = start_edge(tmp_path, address, "a")
    client = Client(address)
    try:
        wait_workers(client, 1)
        client.submit(JobSpec("named", LowRank(r=2), AdamW(lr=1e-2)), examples(96, 8, seed=2), steps=2, batch_size=4)
        assert wait_done(client, "named").state == "done"
        path = client.export("named", tmp_path / "peft", format="peft")
        assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    finally:
        client.close()
        stop(edge, server)
