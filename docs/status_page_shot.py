"""Regenerates docs/status-page.png from a real run: `colaflow serve` (tiny Llama, with tokens), two
edge daemons on loopback, three tenants' jobs (two finished, one running), and headless Chromium.

    .venv/bin/python docs/status_page_shot.py [OUT.png]    # about a minute on 2 cores; needs chromium
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from colaflow import AdamW, JobSpec, LowRank
from colaflow.local import start_edge, start_server, stop
from colaflow.wire.client import Client

ADMIN = "admin-token-for-the-screenshot"
TENANTS = {"acme": "acme-token-for-the-screenshot", "globex": "globex-token-for-the-screenshot",
           "initech": "initech-token-for-the-screenshot"}
JOBS = [("acme", "acme-support-lora", 60), ("globex", "globex-summaries", 40), ("initech", "initech-faq", 600)]


def examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(1, 96, (12,), generator=g).tolist()), "labels": ids} for _ in range(n)]


def main(out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs chromium (apt-get install -y chromium)")
    work = Path(tempfile.mkdtemp(prefix="colaflow-shot-"))
    (work / "tokens.txt").write_text(f"{ADMIN} admin\nworker-token-for-the-screenshot worker\n" +
                                     "".join(f"{t} control {name}\n" for name, t in TENANTS.items()))
    (work / "worker.token").write_text("worker-token-for-the-screenshot")
    server, address = start_server(work, "--tokens", str(work / "tokens.txt"))
    url = re.search(r"status page at (\S+)", server.stdout.readline()).group(1)
    edges = [start_edge(work, address, f"laptop-{i}", "--token-file", str(work / "worker.token")) for i in (1, 2)]
    clients = {name: Client(address, token=t) for name, t in TENANTS.items()}
    admin = Client(address, token=ADMIN)
    try:
        while admin.health().workers < len(edges):  # both daemons share the jobs' sites
            time.sleep(0.2)
        for i, (tenant, job, steps) in enumerate(JOBS):
            clients[tenant].submit(JobSpec(job, LowRank(r=4), AdamW(lr=1e-2)), examples(8, i), steps=steps,
                                   batch_size=4)
        while not all(clients[t].get(j).state == "done" for t, j, _ in JOBS[:2]) or \
                clients["initech"].get("initech-faq").step < 80:
            time.sleep(0.5)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={work / 'profile'}", "--virtual-time-budget=10000",
                        "--window-size=1280,700", f"--screenshot={out.resolve()}", f"{url}?token={ADMIN}"],
                       check=True, capture_output=True, timeout=120)
        print(f"wrote {out}")
    finally:
        for c in [*clients.values(), admin]:
            c.close()
        stop(*edges, server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("status-page.png")))
