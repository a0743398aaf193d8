"""Fuzzing both services: hypothesis drives a live server (real gRPC, loopback) with malformed and
adversarial message sequences while an honest worker trains an honest job. The server never
dies, its memory stays bounded, the attackers learn nothing of the honest job, and the honest
job's final adapters equal its failure-free run's, bit for bit. Tenants' `init` exports whose
metadata lies and hostile bytes on the status page's HTTP port are refused, never a crash.

COLAFLOW_FUZZ_EXAMPLES sets the number of hostile sequences (default 60)."""
from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transport import reference

from colaflow import AdamW, JobSpec, LowRank, Update, Worker
from colaflow.control.protocol import Hello, Packets, Refusal
from colaflow.engine.host import Host
from colaflow.models import tiny
from colaflow.server.auth import Tokens
from colaflow.server.coordinator import Coordinator
from colaflow.server.service import make_server
from colaflow.server.status import StatusServer
from colaflow.v1 import control_pb2, control_pb2_grpc, worker_pb2, worker_pb2_grpc
from colaflow.wire import serde
from colaflow.wire.channel import work_call
from colaflow.wire.client import Client
from colaflow.wire.framing import frame_message, to_chunks
from colaflow.wire.link import WorkerLink
from procs import examples

EXAMPLES = int(os.environ.get("COLAFLOW_FUZZ_EXAMPLES", "60"))
HONEST = JobSpec("honest", LowRank(r=4), AdamW(lr=1e-2), staleness=1)
STEPS = 30


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.fixture(scope="module")
def live():
    """A server (in this process, one compute thread) and one honest worker already training."""
    torch.set_num_threads(1)
    coordinator = Coordinator(Host(tiny("llama")), reassign_after=3600)
    server, port = make_server(coordinator, Tokens(None))
    server.start()
    loop = threading.Thread(target=coordinator.run, daemon=True)
    loop.start()
    address = f"127.0.0.1:{port}"
    link = WorkerLink(address, Worker("honest-worker"))
    threading.Thread(target=link.run, daemon=True).start()
    assert link.connected.wait(30)
    ex = examples(96, 16, seed=11)
    client = Client(address)
    client.submit(HONEST, ex, steps=STEPS, batch_size=4)
    yield address, coordinator, client, ex
    link.stop()
    coordinator.stop()
    server.stop(0)
    torch.set_num_threads(2)


def _update(job: str, site: str, version: int, fill: float) -> Update:
    return Update(job, site, version, {"A": torch.full((4, 32), fill), "B": torch.full((32, 4), fill)}, 0.0,
                  version - 1)


# one hostile message: what a confused or malicious client can put on the Work stream
hostile = st.one_of(
    st.binary(max_size=64).map(lambda b: ("raw", b)),  # not even a frame
    st.tuples(st.integers(0, 2 ** 32 - 1), st.binary(max_size=32)).map(  # a length prefix that lies
        lambda t: ("raw", struct.pack("<I", t[0]) + t[1])),
    st.integers(0, 2 ** 32 - 1).map(lambda n: ("msg", worker_pb2.WorkerMessage(credit=worker_pb2.Credit(packets=n)))),
    st.text(max_size=300).map(lambda r: ("msg",
                                         worker_pb2.WorkerMessage(goodbye=worker_pb2.Goodbye(reason=r, leaving=True)))),
    # chunk bookkeeping that lies
    st.tuples(st.integers(0, 2 ** 31), st.integers(0, 2 ** 31), st.integers(0, 2 ** 62)).map(
        lambda t: ("msg", worker_pb2.WorkerMessage(update=worker_pb2.Chunk(seq=1, index=t[0] % 4, count=t[1] % 5,
                                                                           payload_bytes=t[2])))),
    st.sampled_from(["model.layers.0.self_attn.q_proj", "nope"]).flatmap(  # forged updates for the honest job
        lambda site: st.tuples(st.integers(1, 40), st.sampled_from([0.0, 1e30, float("nan")])).map(
            lambda t: ("update", _update("honest", site, *t)))),
    st.text(max_size=50).map(lambda r: ("refusal", Refusal("honest", "model.layers.0.self_attn.q_proj", 0, r))),
    st.just(("hello", None)),  # a second Hello mid-stream
)


def _attack(address: str, worker_id: str, messages: list) -> None:
    """Register (as a fresh id), open Work, send `messages`, read what comes back briefly, close."""
    channel = grpc.insecure_channel(address)
    try:
        md = [("x-worker-id", worker_id)]
        session = worker_pb2_grpc.WorkerStub(channel).Register(worker_pb2.RegisterRequest(worker_id=worker_id),
                                                               metadata=md, timeout=10).session
        out: queue.Queue = queue.Queue()
        out.put(serde.opening(session, Hello()))
        for kind, m in messages:
            if kind == "raw":
                out.put(m)
            elif kind == "msg":
                out.put(frame_message(m))
            elif kind == "hello":
                out.put(serde.opening(session, Hello()))
            elif kind == "update":
                frame, parts = serde.update_to_proto(m)
                for raw in to_chunks(frame, parts, 7, lambda c: worker_pb2.WorkerMessage(update=c)):
                    out.put(raw)
            else:
                for raw in serde.to_server(m, 0):
                    out.put(raw)
        out.put(None)
        responses = work_call(channel)(iter(out.get, None), metadata=md, timeout=3)
        try:
            for raw in responses:
                msg = serde.Inbox("worker").feed(raw)
                assert not isinstance(msg, Packets) or msg.job != "honest"  # nothing of the honest job leaks
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.INTERNAL, e.details()  # refused with a reason, not a crash
        except ValueError:
            pass  # a partial chunk cut off by the deadline
    finally:
        channel.close()


def test_hostile_sequences_leave_the_server_and_the_honest_job_intact(live):
    address, coordinator, client, ex = live
    start_rss = _rss_kib()
    counter = iter(range(10 ** 9))

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile, min_size=1, max_size=6))
    def attack(messages):
        _attack(address, f"fuzz-{next(counter)}", messages)

    attack()
    control = control_pb2_grpc.ControlStub(grpc.insecure_channel(address))
    for bad in (control_pb2.SubmitJobRequest(spec=b"\xc1", data=b"", steps=1),
                control_pb2.SubmitJobRequest(spec=serde.pack({"job_id": "x", "adapter": {"kind": "zz"}}), data=b"",
                                             steps=1),
                control_pb2.SubmitJobRequest(spec=serde.pack({"job_id": "x"}), data=serde.pack({"examples": [{}]}),
                                             steps=1),
                control_pb2.SubmitJobRequest(spec=serde.pack({"job_id": "x"}),
                                             data=serde.pack({"examples": [{"input_ids": [1e300]}]}), steps=1)):
        with pytest.raises(grpc.RpcError) as e:
            control.SubmitJob(bad, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    end = time.time() + 120
    while client.get("honest").state in ("waiting", "running"):
        assert time.time() < end, client.get("honest")
        time.sleep(0.1)
    status = client.get("honest")
    assert status.state == "done", status.error
    assert coordinator.health().status == "serving"
    grown = _rss_kib() - start_rss
    print(f"fuzz: {EXAMPLES} hostile sequences; server RSS grew {grown / 1024:.1f} MiB")
    assert grown < 200 * 1024  # KiB
    import tempfile
    from pathlib import Path

    from colaflow.export import load

    with tempfile.TemporaryDirectory() as tmp:
        _, adapters = load(client.export("honest", Path(tmp) / "e"))
    want = reference(HONEST, ex, STEPS)
    for site, a in adapters.items():
        for n, p in a.named_parameters():
            assert torch.equal(p.detach(), want[site][n]), site


# a tenant's `init` export whose metadata lies: sizes, shapes, dtypes, byte ranges, the header's length

Q0 = "model.layers.0.self_attn.q_proj"
_site = st.fixed_dictionaries({"name": st.sampled_from([Q0, "model.layers.1.self_attn.q_proj", "nope"]),
                               "kind": st.sampled_from(["linear", "conv2d", "embedding", "zz"]),
                               "in_features": st.integers(-1, 1 << 40), "out_features": st.integers(-1, 1 << 40)})
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I64", "zz"]),
                                "shape": st.lists(st.integers(-1, 1 << 40), max_size=3),
                                "data_offsets": st.lists(st.integers(-1, 1 << 41), max_size=3)})


def _init_blob(sites: list, header: dict, body: bytes, lie: int) -> bytes:
    meta = {"format": "colaflow-adapter", "format_version": 1, "job": {"adapter": LowRank(r=4).to_dict()},
            "sites": sites}
    h = json.dumps(header).encode()
    tensors = ((len(h) + lie) % (1 << 64)).to_bytes(8, "little") + h + body
    return serde.pack({"meta": json.dumps(meta), "tensors": tensors})


def test_hostile_init_exports_are_refused_from_their_metadata(live):
    address, coordinator, _, ex = live
    control = control_pb2_grpc.ControlStub(grpc.insecure_channel(address))
    data = serde.pack({"examples": ex, "batch_size": 4})
    start_rss, counter = _rss_kib(), iter(range(10 ** 9))

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(_site, max_size=4), st.dictionaries(st.sampled_from([f"{Q0}::A", f"{Q0}::B", "x::y"]), _entry,
                                                        max_size=3), st.binary(max_size=64), st.integers(0, 1 << 40))
    def attack(sites, header, body, lie):
        spec = serde.pack(JobSpec(f"init-{next(counter)}", LowRank(r=4)).to_dict())
        request = control_pb2.SubmitJobRequest(spec=spec, data=data, steps=2, init=_init_blob(sites, header, body, lie))
        with pytest.raises(grpc.RpcError) as e:
            control.SubmitJob(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()

    attack()
    assert coordinator.health().status == "serving"
    assert not any(j.startswith("init-") for j in coordinator.scheduler.jobs)
    assert _rss_kib() - start_rss < 100 * 1024  # KiB: nothing was sized by a blob's own claims


# hostile bytes on the status page's port, without a token

_header = st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Origin", b"Cookie",
                                     b"Sec-Fetch-Site", b"X"]), st.binary(max_size=40))
_http = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda method, path, headers, body: method + b" " + path + b" HTTP/1.1\r\n" +
              b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body,
              st.sampled_from([b"GET", b"POST", b"PUT", b"G"]),
              st.sampled_from([b"/", b"/healthz", b"/login", b"/\\evil.example/?token=x", b"/api/jobs/%ff/metrics",
                               b"/api/jobs?since=-1", b"//x", b"*"]),
              st.lists(_header, max_size=5), st.binary(max_size=64)),
)


def test_hostile_http_requests_get_an_answer_or_a_closed_connection(live):
    _, coordinator, _, _ = live
    page = StatusServer(coordinator, Tokens(None), max_connections=16, request_s=2.0).start()
    try:
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_http)
        def attack(raw):
            with socket.create_connection(("127.0.0.1", page.port), timeout=30) as s:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            status = answer.split(b"\r\n", 1)[0]
            assert answer == b"" or status.startswith(b"HTTP/1.1 ") and b" 500 " not in status, answer[:200]

        attack()
        with socket.create_connection(("127.0.0.1", page.port), timeout=30) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        page.stop()
