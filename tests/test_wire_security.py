"""Invariant 7 over gRPC: bad tokens and bad frames are refused with a clear status; the server
keeps serving the other jobs, whose result is unchanged."""
from __future__ import annotations

import queue
import subprocess
import time

import grpc
import pytest
import torch
from test_transport import exported, max_err, reference

from colaflow import AdamW, JobSpec, LowRank, Update
from colaflow.control.protocol import Ack, Assign, Revoke
from colaflow.errors import PermissionDenied, Unavailable
from colaflow.v1 import worker_pb2, worker_pb2_grpc
from colaflow.wire import serde
from colaflow.wire.channel import work_call
from colaflow.wire.client import Client
from colaflow.wire.framing import frame_message, to_chunks
from procs import examples, start_edge, start_server, stop, wait_done, wait_workers

WORKER, CONTROL = "w" * 24, "c" * 24


class Rogue:
    """A hand-driven worker that speaks the protocol and sends what we tell it to."""

    def __init__(self, address: str, token: str = WORKER, worker_id: str = "rogue"):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 128 << 20),
                                                               ("grpc.use_local_subchannel_pool", 1)])
        self.work = work_call(self.channel)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.md = [("authorization", f"Bearer {token}"), ("x-worker-id", worker_id)]
        self.worker_id = worker_id

    def open(self):
        reg = self.stub.Register(worker_pb2.RegisterRequest(worker_id=self.worker_id), metadata=self.md, timeout=10)
        self.out: queue.Queue = queue.Queue()
        self.send(hello=worker_pb2.Hello(session=reg.session))
        self.responses = self.work(iter(self.out.get, None), metadata=self.md)
        return self

    def send(self, **kw):
        self.out.put(frame_message(worker_pb2.WorkerMessage(**kw)))

    def next(self, cls: type, timeout: float = 20):
        """The next message of type `cls` (colaflow.control.protocol), decoded as a worker decodes it."""
        end, inbox = time.time() + timeout, serde.Inbox("worker")
        for raw in self.responses:
            msg = inbox.feed(raw)
            if isinstance(msg, cls):
                return msg
            assert time.time() < end, f"no {cls.__name__} message"

    def send_update(self, frame_parts):
        frame, parts = frame_parts
        for m in to_chunks(frame, parts, 1, lambda c: worker_pb2.WorkerMessage(update=c)):
            self.out.put(m)

    def refused(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            for _ in self.responses:
                pass
        self.close()
        return e.value

    def close(self) -> None:
        self.out.put(None)
        self.channel.close()


def update(job: str, site: str, version: int, fitted: int, params: dict):
    return serde.update_to_proto(Update(job, site, version, params, 0.0, fitted))


@pytest.fixture
def secured(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{WORKER} worker\n{CONTROL} control\n")
    (tmp_path / "worker.token").write_text(WORKER)
    server, address = start_server(tmp_path, "--tokens", str(tokens))
    edge = start_edge(tmp_path, address, "a", "--token-file", str(tmp_path / "worker.token"))
    client = Client(address, token=CONTROL)
    wait_workers(client, 1)
    yield client, address
    client.close()
    stop(edge, server)


def test_tokens_gate_every_call(secured):
    client, address = secured
    with pytest.raises(grpc.RpcError) as e:
        Rogue(address, token="x" * 24).open()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        Rogue(address, token=CONTROL).open()  # a control token cannot act as a worker
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "`worker` token" in e.value.details()
    with pytest.raises(PermissionDenied, match="`control` token"):  # colaflow's own error, not a raw RpcError
        Client(address, token=WORKER).list()


def test_bad_frames_are_refused_and_other_jobs_are_untouched(secured, tmp_path):
    client, address = secured
    ex = examples(96, 16, seed=5)
    good = JobSpec("good", LowRank(r=4), AdamW(lr=1e-2))
    client.submit(good, ex, steps=30, batch_size=4)
    while client.get("good").state == "waiting":
        time.sleep(0.05)
    rogue = Rogue(address).open()
    wait_workers(client, 2)  # the rogue's stream is live before the job it should get exists
    # state_every=0: the rogue's hand-made updates need not carry an optimizer state
    client.submit(JobSpec("mine", LowRank(r=4), state_every=0), examples(96, 8, seed=6), steps=5, batch_size=4)
    a = rogue.next(Assign)
    assert a.job == "mine" and len(a.sites) == 4  # the idle worker takes the new job
    site = a.sites[0].site.name
    ok = {"A": torch.randn(4, 32), "B": torch.zeros(32, 4)}
    foreign = client.get("good").versions
    cases = [
        (update("good", next(iter(foreign)), 99, 98, ok), grpc.StatusCode.PERMISSION_DENIED, "not assigned"),
        (update("nope", site, 1, 0, ok), grpc.StatusCode.PERMISSION_DENIED, "not assigned"),
        (update("mine", site, 3, 2, ok), grpc.StatusCode.INVALID_ARGUMENT, "expected 1"),
    ]
    frame, parts = update("mine", site, 1, 0, ok)
    frame.params["A"].data_bytes -= 4  # the header and the payload disagree by 4 bytes
    cases.append(((frame, parts), grpc.StatusCode.INVALID_ARGUMENT, "`data` has 508 bytes"))
    for frame, code, text in cases:
        rogue.send_update(frame)
        err = rogue.refused()
        assert err.code() == code and text in err.details(), (err.code(), err.details())
        rogue = Rogue(address).open()
    # an oversized chunk, and a message over the server's limit
    rogue.out.put(frame_message(worker_pb2.WorkerMessage(update=worker_pb2.Chunk(
        seq=1, index=0, count=2, payload_bytes=6 << 20)), [b"\0" * (5 << 20)]))
    err = rogue.refused()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in err.details()
    rogue = Rogue(address).open()
    rogue.out.put(frame_message(worker_pb2.WorkerMessage(update=worker_pb2.Chunk(seq=1, index=0, count=1)),
                                      [b"\0" * (70 << 20)]))
    assert rogue.refused().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a valid update is taken; replaying its sequence number (version) changes nothing
    rogue = Rogue(address).open()
    rogue.send_update(update("mine", site, 1, 0, ok))
    assert rogue.next(Ack).version == 1
    rogue.send_update(update("mine", site, 1, 0, {"A": torch.ones(4, 32), "B": torch.ones(32, 4)}))
    assert rogue.next(Ack).version == 1
    client.cancel("mine")
    kept = exported(client, "mine", tmp_path)[site]
    assert torch.equal(kept["A"], ok["A"]) and torch.equal(kept["B"], ok["B"])  # the replay changed nothing
    # parameters of the wrong shape, or NaN: that job fails with why, and the worker is told to drop its
    # sites (before, the stream ended and a worker resent its saved update on every reconnect, for ever)
    for n, params, why in ((1, {"A": torch.randn(4, 32), "B": torch.zeros(31, 4)}, "parameter `B` has shape (31, 4)"),
                           (2, {"A": torch.full((4, 32), float("nan")), "B": torch.zeros(32, 4)}, "non-finite")):
        client.submit(JobSpec(f"bad{n}", LowRank(r=4), state_every=0), examples(96, 8, seed=6), steps=5, batch_size=4)
        bad_site = rogue.next(Assign).sites[0].site.name
        rogue.send_update(update(f"bad{n}", bad_site, 1, 0, params))
        assert rogue.next(Revoke).job == f"bad{n}"  # on the same stream: it was not ended
        status = wait_done(client, f"bad{n}")
        assert status.state == "failed" and "worker rogue sent an update it cannot have fitted" in status.error
        assert why in status.error
    # meanwhile the good job ran on; its result is exactly what it would have been alone
    assert wait_done(client, "good").state == "done"
    assert max_err(exported(client, "good", tmp_path), reference(good, ex, 30)) <= 1e-6


def _certs(tmp) -> dict:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=colaflow-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return {k: tmp / f for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def test_tls_end_to_end(tmp_path):
    certs = _certs(tmp_path)
    server, address = start_server(tmp_path, "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]))
    edge = start_edge(tmp_path, address, "a", "--tls-ca", str(certs["ca"]))
    client = Client(address, tls_ca=certs["ca"].read_bytes())
    try:
        wait_workers(client, 1)
        client.submit(JobSpec("tls", LowRank(r=2)), examples(96, 8, seed=7), steps=4, batch_size=4)
        assert wait_done(client, "tls").state == "done"
        with pytest.raises(Unavailable, match="server unavailable"):  # plaintext against a TLS port is refused
            Client(address).health()
    finally:
        client.close()
        stop(edge, server)


POOL, OTHER_POOL, LAPTOP, ACME, GLOBEX, ADMIN = "w" * 24, "x" * 24, "p" * 24, "a" * 24, "b" * 24, "z" * 24


@pytest.fixture
def tenants(tmp_path):
    """A server with a pool worker token, a worker token bound to `laptop-1`, two tenants and admin."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{POOL} worker\n{OTHER_POOL} worker\n{LAPTOP} worker laptop-1\n"
                      f"{ACME} control acme\n{GLOBEX} control globex\n{ADMIN} admin\n")
    server, address = start_server(tmp_path, "--tokens", str(tokens))
    yield address
    stop(server)


def test_a_worker_id_cannot_be_taken_over(tenants):
    address = tenants
    Rogue(address, token=POOL, worker_id="victim").open()  # the first to register `victim` owns the id
    with pytest.raises(grpc.RpcError) as e:
        Rogue(address, token=OTHER_POOL, worker_id="victim").open()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to another credential" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        Rogue(address, token=LAPTOP, worker_id="someone-else").open()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "for worker 'laptop-1'" in e.value.details()
    Rogue(address, token=LAPTOP, worker_id="laptop-1").open()  # its own id is fine


def test_tenants_see_and_touch_only_their_own_jobs(tenants, tmp_path):
    from colaflow.errors import NotFound

    address = tenants
    acme, globex, admin = (Client(address, token=t) for t in (ACME, GLOBEX, ADMIN))
    acme.submit(JobSpec("acme-job", LowRank(r=2)), examples(96, 8, seed=0), steps=2, batch_size=4)
    assert [s.job for s in acme.list()] == ["acme-job"] and globex.list() == []
    for act in (lambda: globex.get("acme-job"), lambda: globex.cancel("acme-job"),
                lambda: globex.export("acme-job", tmp_path / "stolen"), lambda: globex.metrics_so_far("acme-job")):
        with pytest.raises(NotFound, match="unknown job 'acme-job'"):  # indistinguishable from no such job
            act()
    assert acme.get("acme-job").state == "waiting" and [s.job for s in admin.list()] == ["acme-job"]
    anonymous = Client(address).health()  # anyone may ask whether it serves, and learns nothing more
    assert anonymous.status == "serving" and anonymous.jobs == 0 and anonymous.workers == 0
    assert acme.health().jobs == 1 and globex.health().jobs == 0


def test_many_held_worker_streams_leave_control_calls_fast(tenants):
    """A stream is a coroutine, not a thread: past the old 32-thread pool, control still answers at once."""
    address = tenants
    rogues = [Rogue(address, token=POOL, worker_id=f"idle-{i}").open() for i in range(64)]
    admin = Client(address, token=ADMIN)
    end = time.time() + 30
    while admin.health().workers < 64:
        assert time.time() < end, admin.health()
        time.sleep(0.1)
    for _ in range(5):
        t = time.perf_counter()
        admin.list()
        admin.submit(JobSpec(f"j{_}", LowRank(r=2)), examples(96, 8, seed=0), steps=1, batch_size=4)
        assert time.perf_counter() - t < 1.0
    for r in rogues:
        r.close()


def test_an_idle_worker_hears_heartbeats_while_others_are_busy(secured):
    """Wake-ups meant for busy workers must not starve an idle one's heartbeats (its liveness signal)."""
    from colaflow.wire.serde import Heartbeat

    client, address = secured
    idle = Rogue(address, worker_id="idle").open()
    wait_workers(client, 2)
    client.submit(JobSpec("busy", LowRank(r=2)), examples(96, 16, seed=2), steps=400, batch_size=4)
    while client.get("busy").state == "waiting":
        time.sleep(0.05)
    t = time.time()
    for _ in range(3):
        idle.next(Heartbeat, timeout=5)
    assert time.time() - t < 5 and client.get("busy").state == "running"
    client.cancel("busy")
    idle.close()
