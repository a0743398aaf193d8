"""Workers that come back take work, over real processes: an edge daemon killed with kill -9 mid-job
is shown as lost (in `colaflow logs --follow`'s events and on the status page's JSON), its sites
move to the other daemon; restarted on its state dir, it returns and takes a share of the running
job back (rebalancing, from the durable learner state), and the job still finishes with the
failure-free adapters, bit for bit."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

from test_transport import exported, max_err, reference

from colaflow import AdamW, JobSpec, LowRank
from colaflow.wire.client import Client
from procs import examples, start_edge, start_server, stop, wait_done, wait_workers

STEPS = 400  # long enough that the daemon's restart (a second or two) comes well before the end


def _owners(client: Client, job: str) -> dict[str, str]:
    """{worker: state} of the workers holding sites of `job` (and every lost one)."""
    return {w["worker"]: w["state"] for w in client.workers() if job in w["sites"] or w["state"] == "lost"}


def _wait(what, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"not within {timeout} s: {what.__doc__ or what}")


def test_a_daemon_killed_and_restarted_takes_a_share_back_and_the_job_is_exact(tmp_path):
    server, address = start_server(tmp_path, "--reassign-after", "1", "--http-port", "0")
    edges = {n: start_edge(tmp_path, address, n) for n in ("a", "b")}
    client = Client(address)
    try:
        wait_workers(client, 2)
        line = server.stdout.readline()  # after "listening on": `colaflow serve: status page at URL`
        assert "status page at " in line, line
        page = line.split("status page at ")[1].strip().rstrip("/")
        ex = examples(96, 16, seed=11)
        spec = JobSpec("back", LowRank(r=4), AdamW(lr=1e-2), staleness=1)
        client.submit(spec, ex, steps=STEPS, batch_size=4)
        _wait(lambda: client.get("back").step >= 5)
        assert set(_owners(client, "back")) == {"a", "b"}  # one attention's q and v each
        edges["a"].send_signal(signal.SIGKILL)
        edges["a"].wait()

        def lost():
            """daemon a shown as lost, its sites on b"""
            owners = _owners(client, "back")
            return owners.get("a") == "lost" and [w for w, s in owners.items() if s != "lost"] == ["b"]
        _wait(lost)
        with urllib.request.urlopen(f"{page}/api/workers", timeout=10) as r:  # the status page's own JSON
            assert {w["worker"]: w["state"] for w in json.load(r)["workers"]}["a"] == "lost"

        edges["a"] = start_edge(tmp_path, address, "a")  # the same state dir: it restores its learners

        def back():
            """daemon a holds sites of the running job again"""
            w = {x["worker"]: x for x in client.workers()}
            return w.get("a", {}).get("state") == "connected" and "back" in w["a"]["sites"]
        _wait(back)
        took_share_at = client.get("back").step
        print(f"daemon a took its share back at step {took_share_at} of {STEPS}")
        assert took_share_at < STEPS, "the job ended before the daemon came back: the test proves nothing"
        assert wait_done(client, "back", timeout=300).state == "done"
        assert max_err(exported(client, "back", tmp_path), reference(spec, ex, STEPS)) == 0.0

        logs = subprocess.run([sys.executable, "-m", "colaflow.cli.main", "logs", "back", "--follow",
                               "--server", address], capture_output=True, text=True, timeout=120)
        assert logs.returncode == 0, logs.stderr
        events = [line.strip() for line in logs.stdout.splitlines() if line.strip().startswith("event:")]
        assert any(e.startswith("event: worker a lost") for e in events), events
        assert any(e.startswith("event: worker a returned") for e in events), events
        assert any(e.startswith("event: rebalanced:") and "to worker a" in e for e in events), events
    finally:
        client.close()
        stop(*edges.values(), server)


