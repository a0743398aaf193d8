"""Ended jobs have a lifecycle (issue 22), on a real `colaflow serve` on loopback: an ended job lets
go of its data at once, retention and `colaflow delete` free the rest, a tenant's state-dir quota
refuses with the figure, and many short jobs leave the server's threads and descriptors flat."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from colaflow import JobSpec, LowRank
from colaflow.cli.main import main
from colaflow.errors import InvalidArgument, NotFound, ResourceExhausted
from colaflow.wire.client import Client
from procs import examples, start_edge, start_server, stop, wait_done

TOKENS = {"acme": "acme-control-token-00", "evil": "evil-control-token-00", "worker": "worker-pool-token-0000"}


def _proc(pid: int, key: str) -> int:
    """A field of /proc/PID/status in its own unit (kB for VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _big_map(mib: float, seed: int) -> dict:
    rows = examples(96, 16, seed)
    per_row = sum(len(r["input_ids"]) for r in rows) * 2 / len(rows) + 20  # msgpack bytes, about
    return {"examples": rows * int(mib * (1 << 20) / per_row / len(rows)), "batch_size": 4, "seed": 0}


@pytest.fixture
def server(tmp_path):
    (tmp_path / "tokens.txt").write_text(f"{TOKENS['acme']} control acme\n{TOKENS['evil']} control evil\n"
                                         f"{TOKENS['worker']} worker\n")
    proc, address = start_server(tmp_path, "--tokens", str(tmp_path / "tokens.txt"), "--state-dir",
                                 str(tmp_path / "state"), "--keep-ended", "3", "--tenant-disk-mb", "4",
                                 "--http-port", "off")
    clients = {t: Client(address, token=TOKENS[t]) for t in ("acme", "evil")}
    yield proc, address, clients, tmp_path
    for c in clients.values():
        c.close()
    stop(proc)


def test_submit_and_cancel_cycles_leave_memory_and_the_state_dir_flat(server):
    """Each cancelled job used to keep its data map for ever: ~10x its packed bytes in memory, and on disk."""
    proc, _, clients, work = server
    data = _big_map(2, 0)
    rss = []
    for i in range(10):
        clients["evil"].submit_map(JobSpec(f"cycle{i}", LowRank(r=2)), data, steps=1000)
        clients["evil"].cancel(f"cycle{i}")
        time.sleep(1)  # the step loop lets go of what ended
        rss.append(_proc(proc.pid, "VmRSS") >> 10)
    assert rss[-1] - rss[2] < 75, rss  # MiB, past the first cycles' warm-up: before, ~20 MiB more per cycle
    assert _du(work / "state") < 1 << 20, _du(work / "state")
    kept = sorted(j.job for j in clients["evil"].list())
    assert kept == ["cycle7", "cycle8", "cycle9"]  # --keep-ended 3: the oldest went


def test_a_tenant_deletes_its_ended_jobs_and_its_quota_refuses_with_the_figure(server, capsys):
    _, address, clients, work = server
    acme = clients["acme"]
    small = {"examples": examples(96, 16, 1), "batch_size": 4, "seed": 0}
    acme.submit_map(JobSpec("live", LowRank(r=2)), small, steps=100)
    acme.submit_map(JobSpec("old", LowRank(r=2)), small, steps=100)
    acme.cancel("old")
    with pytest.raises(NotFound, match="unknown job 'old'"):
        clients["evil"].delete("old")  # another tenant's job reads as unknown
    with pytest.raises(InvalidArgument, match="is waiting: cancel it first"):
        acme.delete("live")
    args = ["--server", address, "--token", TOKENS["acme"]]
    assert main(["delete", "old", *args]) == 0 and capsys.readouterr().out == "job old deleted\n"
    assert main(["status", "old", *args]) == 1 and "unknown job 'old'" in capsys.readouterr().err
    assert not (work / "state" / "old").exists()
    with pytest.raises(ResourceExhausted, match=r"holds \d+\.\d MiB .* would pass its quota of 4\.0 MiB"):
        acme.submit_map(JobSpec("big", LowRank(r=2)), _big_map(5, 2), steps=10)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard package")
def test_thirty_short_jobs_with_tensorboard_leave_threads_and_descriptors_flat(tmp_path):
    """Each ended job's TensorBoard writer (a thread and a file) used to stay open: +1 thread a job."""
    proc, address = start_server(tmp_path, "--tensorboard", str(tmp_path / "tb"), "--state-dir",
                                 str(tmp_path / "state"))
    edge = start_edge(tmp_path, address, "e1")
    client = Client(address)
    data = {"examples": examples(96, 8, 0), "batch_size": 4, "seed": 0}
    try:
        counts = []
        for i in range(30):
            client.submit_map(JobSpec(f"short{i}", LowRank(r=2)), data, steps=2)
            assert wait_done(client, f"short{i}").state == "done"
            if i in (4, 29):
                time.sleep(5)  # TensorBoard's writer loop (every 2 s) writes the last rows, then closes
                counts.append((_proc(proc.pid, "Threads"), len(os.listdir(f"/proc/{proc.pid}/fd"))))
        (threads5, fds5), (threads30, fds30) = counts
        assert threads30 <= threads5 + 2 and fds30 <= fds5 + 4, counts
        assert len(list((tmp_path / "tb").iterdir())) == 30  # every job's scalars were written
    finally:
        client.close()
        stop(edge, proc)
