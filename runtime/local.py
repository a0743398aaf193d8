"""A colaflow server and edge daemons as local processes on loopback (demo, tests, laptops).

    with LocalCluster("smollm2-135m", workers=2) as cluster:
        cluster.client.submit(spec, examples, steps=100)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

COLAFLOW = [sys.executable, "-m", "colaflow.cli.main"]


def start_server(workdir: Path, *args: str, model: str = "tiny-llama",
                 threads: int = 1) -> tuple[subprocess.Popen, str]:
    """`colaflow serve` on a free loopback port; returns (process, "127.0.0.1:PORT"). Logs: workdir/server.log."""
    log = open(workdir / "server.log", "a")
    proc = subprocess.Popen([*COLAFLOW, "serve", "--model", model, "--port", "0", "--threads", str(threads), *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{(workdir / 'server.log').read_text()[-3000:]}")
    return proc, m.group(1)


def start_edge(workdir: Path, address: str, name: str, *args: str, threads: int = 1) -> subprocess.Popen:
    """`colaflow edge` with its state in workdir/edge-NAME; logs: workdir/edge-NAME.log."""
    log = open(workdir / f"edge-{name}.log", "a")
    return subprocess.Popen([*COLAFLOW, "edge", "--server", address, "--state-dir", str(workdir / f"edge-{name}"),
                             "--worker-id", name, "--threads", str(threads), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stop(*procs: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL whatever has not exited after `timeout`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LocalCluster:
    """One server and `workers` edge daemons; `client` talks to the server."""

    def __init__(self, model: str, workers: int = 2, workdir: str | Path | None = None,
                 server_threads: int = 1, edge_threads: int = 1, server_args: tuple[str, ...] = (),
                 edge_args: tuple[str, ...] = (), edge_via=None):
        self.model, self.workers = model, workers
        self.server_args, self.edge_args = tuple(server_args), tuple(edge_args)
        self.edge_via = edge_via  # address -> the address the daemons dial (e.g. a link shaper's)
        self.server_threads, self.edge_threads = server_threads, edge_threads
        self._tmp = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="colaflow-"))
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalCluster:
        # SIGTERM (a CI timeout, `kill`) ends this process through `__exit__`, which stops the daemons:
        # the default action would leave them running with no parent
        self._sigterm = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return self._start()
        except BaseException:
            self.__exit__(*sys.exc_info())  # what started before the failure stops with it
            raise

    def _start(self) -> LocalCluster:
        from .wire.client import Client

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs["server"], self.address = start_server(self.workdir, *self.server_args, model=self.model,
                                                            threads=self.server_threads)
        dial = self.edge_via(self.address) if self.edge_via else self.address
        for i in range(self.workers):
            name = f"edge{i + 1}"
            self.procs[name] = start_edge(self.workdir, dial, name, *self.edge_args,
                                          threads=self.edge_threads)
        self.client = Client(self.address)
        end = time.time() + 120
        while self.client.health().workers < self.workers:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > end:
                raise RuntimeError(f"{dead or 'workers'} did not come up; logs in {self.workdir}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if getattr(self, "client", None) is not None:
                self.client.close()
            stop(*self.procs.values())
            if self._tmp and exc[0] is None:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
