"""What the status page shows a person, in headless Chromium: the header's counts in words ("1 job"),
a chart of a single point on a sensible axis (around the value, not -1 to 1), and an edge daemon
killed with kill -9 mid-job shown as lost, with the job's events (worker lost, sites moved) listed
under its charts. Skips, saying why, without Chromium (.ci/run installs it)."""
from __future__ import annotations

import re
import signal
import time

from test_rebalance import _wait
from test_status_page import Cells, chromium

from colaflow import AdamW, JobSpec, LowRank
from colaflow.wire.client import Client
from procs import examples, start_edge, start_server, stop, wait_done, wait_workers


def _page(url: str, tmp_path, name: str) -> str:
    out = chromium(f"--user-data-dir={tmp_path / name}", "--dump-dom", url)
    assert 'data-ready="1"' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_the_page_shows_counts_in_words_one_point_charts_and_a_lost_worker_with_its_events(tmp_path):
    server, address = start_server(tmp_path, "--reassign-after", "1", "--http-port", "0")
    url = server.stdout.readline().split("status page at ")[1].strip()
    edges = {n: start_edge(tmp_path, address, n) for n in ("a", "b")}
    client = Client(address)
    try:
        wait_workers(client, 2)
        client.submit(JobSpec("one", LowRank(r=2), AdamW(lr=1e-2)), examples(96, 8, 1), steps=1, batch_size=4)
        assert wait_done(client, "one").state == "done"
        loss = client.get("one").loss
        dom = _page(url, tmp_path, "first")
        assert re.search(r'id="summary"[^>]*>1 job · 2 workers connected[ <]', dom), dom[:3000]
        chart = re.search(r'<svg[^>]*data-key="loss".*?</svg>', dom, re.S).group(0)
        # the y axis' two labels (top, bottom), then the x axis' last step
        labels = [float(x) for x in re.findall(r'text-anchor="end"[^>]*>([-0-9.e+]+)</text>', chart)][:2]
        assert "<circle" in chart  # the one point is drawn (a line through one point is not)
        assert labels[1] < loss < labels[0] and labels[0] - labels[1] <= 0.25 * abs(loss), (labels, loss)  # not ±1

        client.submit(JobSpec("long", LowRank(r=2), AdamW(lr=1e-2)), examples(96, 8, 2), steps=100_000,
                      batch_size=4)
        _wait(lambda: client.get("long").step >= 3)
        edges["a"].send_signal(signal.SIGKILL)
        edges["a"].wait()

        def lost_event():
            """the job's metrics carry the loss of worker a (its next step after the move)"""
            return any(e.startswith("worker a lost") for m in client.metrics_so_far("long")
                       for e in m.get("events", []))
        _wait(lost_event)
        time.sleep(0.5)
        dom = _page(url, tmp_path, "second")
        cells = Cells()
        cells.feed(dom)
        assert cells.rows["a"]["state"] == "lost" and cells.rows["b"]["state"] == "connected", cells.rows
        assert re.search(r'id="summary"[^>]*>2 jobs · 1 worker connected[ <]', dom)
        panel = re.search(r'<div class="panel" data-job="long">.*?</div></div>|<div class="panel" data-job="long">.*',
                          dom, re.S).group(0)
        events = re.findall(r"<li>(step \d+: [^<]*)</li>", panel)
        assert any("worker a lost" in e for e in events), events
        assert any("moved to worker b" in e for e in events), events
    finally:
        client.close()
        stop(*edges.values(), server)
