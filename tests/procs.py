"""Real processes on loopback for the transport tests: a server and edge daemons."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from colaflow.loss import IGNORE

COLAFLOW = str(Path(sys.executable).parent / "colaflow")


def start_server(tmp: Path, *args: str, model: str = "tiny-llama") -> tuple[subprocess.Popen, str]:
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([COLAFLOW, "serve", "--model", model, "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{(tmp / 'server.log').read_text()[-3000:]}")
    return proc, m.group(1)


def start_edge(tmp: Path, address: str, name: str, *args: str) -> subprocess.Popen:
    state = tmp / f"edge-{name}"
    log = open(tmp / f"edge-{name}.log", "a")
    return subprocess.Popen([COLAFLOW, "edge", "--server", address, "--state-dir", str(state),
                             "--worker-id", name, "--threads", "1", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def examples(vocab: int, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = IGNORE
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def wait_done(client, job: str, timeout: float = 120.0):
    end = time.time() + timeout
    while time.time() < end:
        s = client.get(job)
        if s.state in ("done", "failed", "cancelled"):
            return s
        time.sleep(0.2)
    raise TimeoutError(f"job {job} not done after {timeout} s: {client.get(job)}")
