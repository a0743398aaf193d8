"""`colaflow bench load`: many workers on one server, for a bounded time per count.

The server is `colaflow serve --model tiny-llama` in its own process; the workers are real gRPC
clients — a `Worker` behind a `WorkerLink` each, one thread per worker, in this process — and one
job per 4 workers keeps them all busy (tiny Llama has 4 sites). A sampler calls `Health` and
`ListJobs` every 100 ms. Reported per worker count: packet frames and updates per second, p99
control latency, the server's RSS, and whether every update was acknowledged exactly once (each
worker's unacknowledged list drains; the server counts as many accepted fits as the workers made).
Last line: {"<n>": {"packets_per_s", "updates_per_s", "p99_control_ms", "server_rss_mib", "exactly_once"}}.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .common import report


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _round(n: int, seconds: float) -> dict:
    import torch

    from colaflow import AdamW, JobSpec, LowRank
    from colaflow.control.worker import Worker
    from colaflow.local import start_server, stop
    from colaflow.wire.client import Client
    from colaflow.wire.link import WorkerLink

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="colaflow-load-"))
    server, address = start_server(work, "--reassign-after", "3600")
    client = Client(address)
    links = [WorkerLink(address, Worker(f"load-{i}"), max_backoff=2.0) for i in range(n)]
    threads = [threading.Thread(target=link.run, daemon=True) for link in links]
    try:
        for t in threads:
            t.start()
        end = time.time() + 120
        while client.health().workers < n:
            if time.time() > end:
                raise TimeoutError(f"only {client.health().workers} of {n} workers connected")
            time.sleep(0.1)
        g = torch.Generator().manual_seed(0)
        examples = [{"input_ids": torch.randint(1, 96, (12,), generator=g).tolist()} for _ in range(32)]
        jobs = [f"load-{j}" for j in range(max(1, n // 4))]
        for job in jobs:
            client.submit(JobSpec(job, LowRank(r=2), AdamW(lr=1e-3), staleness=1), examples, steps=10 ** 6,
                          batch_size=4)
        latencies: list[float] = []
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(0.1):
                t = time.perf_counter()
                client.health()
                client.list()
                latencies.append(time.perf_counter() - t)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(3)  # everyone assigned and streaming
        before = {s.job: s.step for s in client.list()}
        fits_before = sum(link.worker.fits for link in links)
        t0 = time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - t0
        after = {s.job: s.step for s in client.list()}
        fits = sum(link.worker.fits for link in links) - fits_before
        rss = _rss_mib(server.pid)
        steps = sum(after[j] - before.get(j, 0) for j in after)
        for job in jobs:
            client.cancel(job)
        stop_sampling.set()
        sampler.join(5)
        time.sleep(2)  # the last acknowledgements arrive
        unacked = sum(len(us) for link in links for us in link.worker.unacked.values())
        accepted = sum(m[-1]["fits"] if m else 0 for m in (client.metrics_so_far(j) for j in jobs))
        made = sum(link.worker.fits for link in links)
        stalled = [j for j in jobs if after[j] <= before.get(j, 0)]
    finally:
        for link in links:
            link.stop()
        client.close()
        stop(server)
    lat = sorted(latencies)
    return {"packets_per_s": round(steps * 4 / elapsed, 1), "updates_per_s": round(fits / elapsed, 1),
            "p99_control_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "median_control_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "server_rss_mib": round(rss, 1), "stalled_jobs": len(stalled), "updates_made": made,
            "updates_accepted": accepted, "unacknowledged": unacked,
            # no update counted twice, none left unacknowledged; the difference is what the cancel cut off
            "exactly_once": unacked == 0 and accepted <= made}


def main(args: argparse.Namespace) -> int:
    counts = args.workers or [8, 16, 64, 256]
    print(f"load: tiny-llama server, {counts} workers, {args.seconds} s each; a job per 4 workers", flush=True)
    out = {}
    for n in counts:
        r = out[str(n)] = _round(n, args.seconds)
        print(f"  {n:4d} workers  {r['packets_per_s']:8.1f} packets/s  {r['updates_per_s']:8.1f} updates/s  "
              f"control p99 {r['p99_control_ms']} ms (median {r['median_control_ms']})  server RSS "
              f"{r['server_rss_mib']} MiB  stalled jobs {r['stalled_jobs']}  updates made/accepted/unacked "
              f"{r['updates_made']}/{r['updates_accepted']}/{r['unacknowledged']}",
              flush=True)
    report(out)
    return 0
