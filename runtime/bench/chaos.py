"""`colaflow bench chaos`: several tenants' jobs on one server and four workers, while a fault
injector kills workers (some with their disk), kills and restarts the server, cuts and delays
connections, fills a worker's disk and corrupts a worker's checkpoint; and a hostile tenant and a
stranger do their worst: trickling HTTP connections, a hostile `init` export, a job that evaluates
256 rows every step, submitted, cancelled and deleted again and again. Loopback only, bounded.

Every honest job's final adapters are compared, bit for bit, with its failure-free in-process run;
`/healthz` must answer through the trickling, and the hostile `init` must be refused.
Last line: {"faults": {kind: count}, "jobs": n, "completed": n, "identical": n, "hostile": {...}, "seconds": s}.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from .common import report

POOL, ACME, GLOBEX = "chaos-worker-pool-token", "chaos-tenant-acme-token", "chaos-tenant-globex-token"
EVIL = "chaos-tenant-evil-token-0"


class FlakyProxy:
    """A loopback TCP proxy that adds latency to every chunk and can cut every live connection."""

    def __init__(self, upstream: tuple[str, int], delay: float = 0.002):
        self.upstream, self.delay = upstream, delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                try:
                    client.close()
                except Exception:
                    pass
                continue
            with self.lock:
                self.live += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            live, self.live = self.live, []
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chaos:
    def __init__(self, work: Path, seed: int):
        self.work, self.rng = work, random.Random(seed)
        (work / "tokens.txt").write_text(f"{POOL} worker\n{ACME} control acme\n{GLOBEX} control globex\n"
                                         f"{EVIL} control evil\n")
        (work / "worker.token").write_text(POOL)
        self.port = _free_port()
        self.server = self._serve()
        self.proxy = FlakyProxy(("127.0.0.1", self.port))
        self.edges: dict[str, subprocess.Popen] = {}
        for name in ("e0", "e1", "e2", "e3"):
            self.edges[name] = self._edge(name)
        self.faults: Counter = Counter()
        self.hostile: Counter = Counter()  # what the hostile tenant and the stranger got
        self.evil_jobs = 0

    def _serve(self) -> subprocess.Popen:
        log = open(self.work / "server.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "colaflow.cli.main", "serve", "--model", "tiny-llama",
                                 "--port", str(self.port), "--threads", "1", "--tokens", str(self.work / "tokens.txt"),
                                 "--state-dir", str(self.work / "server-state"), "--reassign-after", "2",
                                 "--http-port", "0", "--keep-ended", "2"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        if "listening on" not in proc.stdout.readline():
            raise RuntimeError(f"server did not start: {(self.work / 'server.log').read_text()[-2000:]}")
        self.http_port = int(proc.stdout.readline().strip().rsplit(":", 1)[1].rstrip("/"))
        return proc

    def _edge(self, name: str) -> subprocess.Popen:
        address = self.proxy.address if name == "e0" else f"127.0.0.1:{self.port}"  # e0 lives behind the flaky link
        log = open(self.work / f"edge-{name}.log", "a")
        return subprocess.Popen([sys.executable, "-m", "colaflow.cli.main", "edge", "--server", address, "--threads",
                                 "1",
                                 "--worker-id", name, "--state-dir", str(self.work / f"edge-{name}"),
                                 "--token-file", str(self.work / "worker.token")],
                                stdout=log, stderr=subprocess.STDOUT)

    def _kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def inject(self) -> str:
        kind = self.rng.choice(["kill_worker", "kill_worker", "lose_worker", "kill_server", "cut_links",
                                "full_disk", "corrupt_checkpoint", "slow_http", "hostile_init", "evil_eval"])
        name = self.rng.choice(sorted(self.edges))
        if kind in ("kill_worker", "lose_worker"):
            self._kill(self.edges[name])
            if kind == "lose_worker":
                shutil.rmtree(self.work / f"edge-{name}", ignore_errors=True)
                time.sleep(2.5)  # longer than --reassign-after: its sites move, with the server's learner state
            self.edges[name] = self._edge(name)
        elif kind == "kill_server":
            self._kill(self.server)
            time.sleep(self.rng.uniform(0.2, 1.5))
            self.server = self._serve()
        elif kind == "cut_links":
            self.proxy.cut()
        elif kind == "full_disk":  # the running worker's files may not grow: every checkpoint write fails
            pid = self.edges[name].pid
            try:
                _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (1024, hard))  # the soft limit: raised again below
                time.sleep(4)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
            except ProcessLookupError:
                pass
        elif kind == "corrupt_checkpoint":
            self._kill(self.edges[name])
            for f in (self.work / f"edge-{name}").glob("*.pt"):
                raw = bytearray(f.read_bytes())
                for _ in range(8):
                    raw[self.rng.randrange(len(raw))] ^= 0xFF
                f.write_bytes(bytes(raw))
            self.edges[name] = self._edge(name)
        elif kind == "slow_http":
            self._slow_http()
        elif kind in ("hostile_init", "evil_eval"):
            self._evil(kind)
        self.faults[kind] += 1
        return kind

    def _slow_http(self, n: int = 300, seconds: float = 3.0) -> None:
        """A stranger holds `n` connections to the status page, a header byte at a time; /healthz must answer."""
        import http.client

        socks = []
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.http_port))
            socks.append(s)
        end = time.time() + seconds
        while time.time() < end:
            for s in socks:
                try:
                    s.send(b"G")
                except OSError:
                    pass
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
                conn.request("GET", "/healthz")
                self.hostile["healthz_ok" if conn.getresponse().status == 200 else "healthz_refused"] += 1
                conn.close()
            except OSError:
                self.hostile["healthz_refused"] += 1
            time.sleep(0.5)
        for s in socks:
            s.close()

    def _evil(self, kind: str) -> None:
        """The hostile tenant: an `init` claiming a 2^30-input site, or a job evaluating 256 rows every
        step that it cancels and deletes at its next turn (retention and the eval's fair share)."""
        import grpc
        from safetensors.torch import save

        from colaflow import JobSpec, LowRank
        from colaflow.errors import ColaflowError
        from colaflow.maps import pack
        from colaflow.v1 import control_pb2
        from colaflow.wire.client import Client

        c = Client(f"127.0.0.1:{self.port}", token=EVIL)
        rows = [{"input_ids": [self.rng.randrange(1, 96) for _ in range(64)]} for _ in range(256)]
        data = {"examples": rows[:16], "batch_size": 4, "seed": 0}
        try:
            if kind == "hostile_init":
                meta = {"format": "colaflow-adapter", "format_version": 1, "job": {"adapter": LowRank(r=8).to_dict()},
                        "sites": [{"name": f"model.layers.{i}.self_attn.{m}_proj", "kind": "linear",
                                   "in_features": 1 << 30, "out_features": 64} for i in (0, 1) for m in "qv"]}
                request = control_pb2.SubmitJobRequest(spec=pack(JobSpec("evil-init", LowRank(r=8)).to_dict()),
                                                       data=pack(data), steps=10,
                                                       init=pack({"meta": json.dumps(meta), "tensors": save({})}))
                try:
                    c.stub.SubmitJob(request, metadata=c.md, timeout=60)
                    self.hostile["init_accepted"] += 1
                except grpc.RpcError as e:
                    self.hostile["init_refused" if e.code() == grpc.StatusCode.INVALID_ARGUMENT else
                                 f"init: {e.code().name}"] += 1
                return
            if self.evil_jobs:  # the last one goes: cancelled, then deleted
                c.cancel(f"evil-{self.evil_jobs}")
                c.delete(f"evil-{self.evil_jobs}")
            self.evil_jobs += 1
            c.submit_map(JobSpec(f"evil-{self.evil_jobs}", LowRank(r=2)),
                         dict(data, eval={"examples": rows, "every": 1}), steps=10_000)
        except ColaflowError as e:  # the server may be restarting
            self.hostile[f"evil: {type(e).__name__}"] += 1
        finally:
            c.close()

    def stop(self) -> None:
        for p in [*self.edges.values(), self.server]:
            self._kill(p)
        self.proxy.sock.close()


def _specs():
    from colaflow import MLP, SGD, AdamW, JobSpec, LowRank

    return [("acme", JobSpec("acme-1", LowRank(r=4), AdamW(lr=1e-2))),
            ("acme", JobSpec("acme-2", LowRank(r=2), AdamW(lr=2e-2), staleness=1, fit_interval=2)),
            ("globex", JobSpec("globex-1", MLP(hidden=8), SGD(lr=0.05, momentum=0.9), staleness=2, state_every=2)),
            ("globex", JobSpec("globex-2", LowRank(r=4), AdamW(lr=1e-2), fit_interval=2))]


def _reference(spec, examples: list[dict], steps: int) -> dict:
    from colaflow import Trainer
    from colaflow.data.batches import from_map, to_map
    from colaflow.models import tiny

    trainer = Trainer(tiny("llama"), [spec])
    batches = from_map(to_map(examples, 4, 0))
    for _ in range(steps):
        trainer.step({spec.job_id: next(batches)})
    return {s: {n: v.detach().clone() for n, v in ps.items()}
            for s, ps in trainer.scheduler.weights(spec.job_id).params.items()}


def main(args: argparse.Namespace) -> int:
    from colaflow.errors import ColaflowError
    from colaflow.export import load
    from colaflow.wire.client import Client

    torch.set_num_threads(1)
    steps, budget = 400, 600.0
    g = torch.Generator().manual_seed(7)
    examples = [{"input_ids": torch.randint(1, 96, (int(torch.randint(6, 14, (1,), generator=g)),),
                                            generator=g).tolist()} for _ in range(16)]
    work = Path(tempfile.mkdtemp(prefix="colaflow-chaos-"))
    print(f"chaos: 4 jobs of 2 tenants x {steps} steps, 4 workers (one behind a flaky link), faults every "
          f"1-3 s, at most {budget:.0f} s; logs in {work}", flush=True)
    chaos = Chaos(work, seed=args.repeats)
    clients = {t: Client(f"127.0.0.1:{chaos.port}", token=tok) for t, tok in (("acme", ACME), ("globex", GLOBEX))}
    t0 = time.time()
    try:
        time.sleep(3)
        for tenant, spec in _specs():
            clients[tenant].submit(spec, examples, steps=steps, batch_size=4)
        pending = {spec.job_id: tenant for tenant, spec in _specs()}
        while pending and time.time() - t0 < budget:
            time.sleep(chaos.rng.uniform(1.0, 3.0))
            kind = chaos.inject()
            print(f"  {time.time() - t0:6.1f} s  {kind}", flush=True)
            for job, tenant in list(pending.items()):
                try:
                    if clients[tenant].get(job).state not in ("waiting", "running"):
                        del pending[job]
                except ColaflowError:
                    pass  # the server is restarting
        end = time.time() + 300  # faults stop; everything must still finish
        while pending and time.time() < end:
            for job, tenant in list(pending.items()):
                try:
                    if clients[tenant].get(job).state not in ("waiting", "running"):
                        del pending[job]
                except ColaflowError:
                    pass
            time.sleep(0.5)
        completed = identical = 0
        for tenant, spec in _specs():
            status = clients[tenant].get(spec.job_id)
            if status.state != "done":
                print(f"  {spec.job_id}: {status.state} {status.error}")
                continue
            completed += 1
            _, adapters = load(clients[tenant].export(spec.job_id, work / f"export-{spec.job_id}"))
            want = _reference(spec, examples, steps)
            same = all(torch.equal(p.detach(), want[s][n])
                       for s, a in adapters.items() for n, p in a.named_parameters())
            identical += same
            verdict = "identical to" if same else "DIFFERENT from"
            print(f"  {spec.job_id}: done, adapters {verdict} the failure-free run")
    finally:
        chaos.stop()
    out = {"faults": dict(chaos.faults), "faults_total": sum(chaos.faults.values()), "jobs": len(_specs()),
           "completed": completed, "identical": identical, "hostile": dict(chaos.hostile),
           "seconds": round(time.time() - t0, 1)}
    report(out)
    held = not chaos.hostile["init_accepted"] and not chaos.hostile["healthz_refused"]
    return 0 if identical == len(_specs()) and held else 1
