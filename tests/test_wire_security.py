"""Invariant 7 over gRPC: bad tokens and bad frames are refused with a clear status; the server
keeps serving the other jobs, whose result is unchanged."""
from __future__ import annotations

import queue
import subprocess
import time

import grpc
import pytest
import torch

from colaflow import AdamW, JobSpec, LowRank, Update, serde
from colaflow.client import Client
from colaflow.errors import PermissionDenied, Unavailable
from colaflow.framing import frame_message, to_chunks
from colaflow.protocol import Ack, Assign
from colaflow.v1 import worker_pb2, worker_pb2_grpc
from colaflow.wire import work_call
from procs import examples, start_edge, start_server, stop, wait_done, wait_workers
from test_transport import exported, max_err, reference

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
        """The next message of type `cls` (colaflow.protocol), decoded as a worker decodes it."""
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
        (update("mine", site, 1, 0, {"A": torch.randn(4, 32), "B": torch.zeros(31, 4)}),
         grpc.StatusCode.INVALID_ARGUMENT, "parameter `B` has shape (31, 4)"),
        (update("mine", site, 1, 0, {"A": torch.full((4, 32), float("nan")), "B": torch.zeros(32, 4)}),
         grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
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
