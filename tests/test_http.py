"""The status page's HTTP side held to the gRPC side's standard (issue 22), on real servers on
loopback: bounded connections and descriptors, a deadline for a whole request, no thread per idle
connection, redirects that stay on this site, and no login from another site."""
from __future__ import annotations

import http.client
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colaflow.engine.host import Host
from colaflow.local import COLAFLOW, stop
from colaflow.models import tiny
from colaflow.server.auth import Tokens
from colaflow.server.coordinator import Coordinator
from colaflow.server.status import StatusServer

TOKEN = "acme-control-token-00"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("http") / "tokens.txt"
    tokens.write_text(f"{TOKEN} control acme\n")
    status = StatusServer(Coordinator(Host(tiny("llama"))), Tokens.load(tokens), max_connections=16,
                          request_s=1.0).start()
    yield status
    status.stop()


def ask(port: int, method: str, path: str, headers: dict | None = None, body: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds` while the client sends `trickle` a byte at a time."""
    end = time.time() + seconds
    sock.settimeout(0.2)
    for i in range(10**6):
        if time.time() > end:
            return False
        try:
            if trickle:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


# no stranger can hold the page, or take the descriptors the gRPC port needs

def test_a_request_must_arrive_whole_within_its_deadline(page):
    """One header byte every 0.2 s once held a thread for ever (the timeout was per read)."""
    with socket.create_connection(("127.0.0.1", page.port)) as s:
        assert closed_within(s, 20, trickle=b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000)


def test_idle_connections_hold_no_thread_and_new_requests_still_answer(page):
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", page.port)) for _ in range(60)]  # more than max_connections
    try:
        time.sleep(0.3)
        assert threading.active_count() <= threads + 4  # the handler pool at most
        assert len(page.http.conns) <= 2 * page.http.max_connections
        assert ask(page.port, "GET", "/healthz")[0] == 200  # the oldest waiting connection made room
    finally:
        for s in held:
            s.close()


def test_trickling_connections_leave_new_grpc_channels_and_healthz_answering(tmp_path):
    """`colaflow serve` with 256 descriptors, 600 connections trickling their headers: the page keeps
    at most an eighth of the descriptors, and gRPC and /healthz still answer new callers."""
    limit = 256
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([*COLAFLOW, "serve", "--model", "tiny-llama", "--port", "0", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=log, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"),
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    try:
        grpc_port = int(re.search(r"listening on \S+:(\d+)", server.stdout.readline()).group(1))
        http_port = int(re.search(r"status page at http://\S+:(\d+)/", server.stdout.readline()).group(1))
        socks = []
        for _ in range(600):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", http_port))
            socks.append(s)
        most = 0
        for _ in range(6):
            for s in socks:
                try:
                    s.send(b"G")
                except OSError:
                    pass
            most = max(most, len(os.listdir(f"/proc/{server.pid}/fd")))
            assert ask(http_port, "GET", "/healthz")[2] == b"ok\n"
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # a new channel each time
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.5)
        assert most < limit // 2, most  # the page's share (2 x an eighth, while evicted ones close) and the rest
        for s in socks:
            s.close()
    finally:
        stop(server)


# requests of the wrong shape

@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n", 431),
    (b"POST /login HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"NONSENSE\r\n\r\n", 400),
])
def test_requests_past_the_bounds_are_refused_saying_why(page, head, status):
    with socket.create_connection(("127.0.0.1", page.port), timeout=30) as s:
        s.sendall(head)
        answer = s.recv(4096)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]


def test_a_connection_serves_several_requests(page):
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=30)
    for _ in range(3):
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"ok\n")
    conn.close()


# logins: redirects stay on this site, and another site cannot log a browser in

@pytest.mark.parametrize("path, where", [
    ("/\\evil.example/", "/"), ("/%5Cevil.example/", "/"), ("//evil.example/", "/"), ("/\\/evil.example", "/"),
    ("/nowhere", "/"), ("/api/jobs", "/api/jobs"), ("/api/jobs/j%2F1/metrics.csv", "/api/jobs/j%2F1/metrics.csv"),
])
def test_a_login_redirects_only_to_this_sites_own_pages(page, path, where):
    status, headers, _ = ask(page.port, "GET", f"{path}?token={TOKEN}&since=2")
    assert status == 303 and headers["location"] == f"{where}?since=2", headers
    assert "set-cookie" in headers


@pytest.mark.parametrize("method, headers", [
    ("POST", {"Origin": "https://evil.example"}),
    ("POST", {"Origin": "null"}),
    ("POST", {"Referer": "https://evil.example/page"}),
    ("POST", {"Sec-Fetch-Site": "cross-site"}),
    ("GET", {"Sec-Fetch-Site": "cross-site"}),
    ("GET", {"Referer": "https://evil.example/"}),
])
def test_a_login_from_another_site_is_refused_and_sets_no_cookie(page, method, headers):
    path, body = ("/login", f"token={TOKEN}") if method == "POST" else (f"/?token={TOKEN}", None)
    status, got, text = ask(page.port, method, path, dict(headers, **{"Content-Type":
                                                                      "application/x-www-form-urlencoded"}), body)
    assert status == 403 and "set-cookie" not in got, (status, got)
    assert b"log in there" in text


@pytest.mark.parametrize("headers", [
    {},  # curl: no Origin, no Referer
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}", "Referer": "http://127.0.0.1:{port}/"},
])
def test_a_login_from_this_site_sets_its_cookie(page, headers):
    headers = {k: v.format(port=page.port) for k, v in headers.items()}
    status, got, _ = ask(page.port, "POST", "/login", dict(headers, **{"Content-Type":
                                                                       "application/x-www-form-urlencoded"}),
                         f"token={TOKEN}")
    assert status == 303 and got["location"] == "/" and "HttpOnly" in got["set-cookie"]


if sys.platform != "linux":  # /proc and RLIMIT_NOFILE in a child: Linux only
    pytestmark = pytest.mark.skip("Linux only")
