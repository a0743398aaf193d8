"""The link shaper of `colaflow bench link`: bytes arrive intact, no sooner than the link allows."""
from __future__ import annotations

import socket
import threading
import time

from colaflow.bench.shaper import Shaper


def _echo_server() -> str:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}"


def test_a_shaped_link_delays_by_its_rtt_and_caps_its_rate():
    mbit, rtt_ms, n = 8.0, 100.0, 200_000  # 200 kB at 1 MB/s: 0.2 s each way, plus 0.1 s of round trip
    link = Shaper(_echo_server(), mbit=mbit, rtt_ms=rtt_ms)
    payload = bytes(range(256)) * (n // 256)
    host, port = link.address.rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    t0 = time.monotonic()
    threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
    got = bytearray()
    while len(got) < len(payload):
        got += c.recv(65536)
    took = time.monotonic() - t0
    assert bytes(got) == payload
    # lower bounds only (a loaded machine may be slower, never faster): serialisation + one RTT
    assert took >= len(payload) * 8 / (mbit * 1e6) + rtt_ms / 1000 * 0.95, took
    end = time.monotonic() + 5  # the counters move just after each chunk is handed on
    while link.bytes["down"] < len(payload) and time.monotonic() < end:
        time.sleep(0.01)
    assert link.bytes["up"] == link.bytes["down"] == len(payload)
    c.close()
    link.close()
