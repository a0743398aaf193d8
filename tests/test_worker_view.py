"""What operators see of workers: the server's `workers_view` while a job trains, and an idle daemon
that keeps quiet (no "0.0 fits/s" every 10 s)."""
from __future__ import annotations

import logging
import threading
import time

import torch

from colaflow import AdamW, JobSpec, LowRank, Worker
from colaflow.engine.host import Host
from colaflow.models import tiny
from colaflow.server.auth import Tokens
from colaflow.server.coordinator import Coordinator
from colaflow.server.service import make_server
from colaflow.wire.client import Client
from colaflow.wire.link import WorkerLink
from procs import examples, wait_done


def test_workers_view_and_an_idle_worker_says_nothing(caplog):
    torch.set_num_threads(1)
    coordinator = Coordinator(Host(tiny("llama")), reassign_after=3600)
    server, port = make_server(coordinator, Tokens(None))
    server.start()
    threading.Thread(target=coordinator.run, daemon=True).start()
    address = f"127.0.0.1:{port}"
    link = WorkerLink(address, Worker("w1"))
    link.report_every = 0.3
    caplog.set_level(logging.INFO, logger="colaflow.link")
    threading.Thread(target=link.run, daemon=True).start()
    client = Client(address)
    try:
        assert link.connected.wait(30)
        time.sleep(1.2)  # idle: several report periods pass
        assert "fits/s" not in caplog.text
        (idle,) = coordinator.scheduler.workers_view()
        assert idle["worker"] == "w1" and idle["state"] == "connected" and idle["sites"] == {}
        assert idle["fits_per_s"] == 0 and idle["last_seen_s"] < 3

        client.submit(JobSpec("viewed", LowRank(r=2), AdamW(lr=1e-2)), examples(96, 8, seed=2), steps=24, batch_size=4)
        while client.get("viewed").step < 10:
            time.sleep(0.05)
        (busy,) = coordinator.scheduler.workers_view()
        assert sorted(busy["sites"]) == ["viewed"] and len(busy["sites"]["viewed"]) == 4
        assert busy["fits_per_s"] > 0 and busy["bytes_in"] > 0 and busy["bytes_out"] > 0
        assert client.get("viewed").workers == ["w1"]
        assert wait_done(client, "viewed").state == "done"
        assert "fits/s" in caplog.text  # it did report while it worked
        over_grpc = client.workers()  # the same view through ListWorkers (no tokens here: admin)
        assert [w["worker"] for w in over_grpc] == ["w1"] and set(over_grpc[0]) == set(busy)
    finally:
        client.close()
        link.stop()
        coordinator.stop()
        server.stop(0)
        torch.set_num_threads(2)
