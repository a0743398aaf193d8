"""A loopback TCP proxy that shapes a link: a bandwidth cap per direction and a round-trip delay.

    with Shaper("127.0.0.1:7000", mbit=100, rtt_ms=20) as link:
        ...connect to link.address instead of the server...

Each direction is a FIFO link of `mbit` Mbit/s: a chunk leaves the sender when the link has
carried everything before it (serialisation), and reaches the far side rtt/2 later
(propagation). The link holds at most its bandwidth-delay product; beyond that the sender's
socket backs up, so TCP's own flow control sits on top, as on a real path. For benchmarks on one
machine; it does not drop or reorder.
"""
from __future__ import annotations

import heapq
import socket
import threading
import time


class Shaper:
    def __init__(self, upstream: str, mbit: float, rtt_ms: float, chunk: int = 64 * 1024):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = mbit * 1e6 / 8  # bytes per second
        self.delay = rtt_ms / 2000.0  # one way, seconds
        self.chunk = chunk
        self.bytes = {"down": 0, "up": 0}  # server -> client, client -> server
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="shaper-accept").start()

    def __enter__(self) -> Shaper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(server, client, "down")
            self._pipe(client, server, "up")

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        """Two threads per direction: one reads and timestamps, one delivers when each chunk is due."""
        due: list[tuple[float, int, bytes]] = []
        cond = threading.Condition()
        state = {"free_at": 0.0, "seq": 0, "eof": False, "queued": 0}
        cap = self.rate * (2 * self.delay + 0.01) + self.chunk  # what the path holds: the sender then waits

        def read() -> None:
            try:
                while data := src.recv(self.chunk):
                    with cond:
                        while state["queued"] > cap:
                            cond.wait()
                        state["queued"] += len(data)
                    now = time.monotonic()
                    with cond:
                        start = max(now, state["free_at"])
                        state["free_at"] = start + len(data) / self.rate
                        state["seq"] += 1
                        heapq.heappush(due, (state["free_at"] + self.delay, state["seq"], data))
                        cond.notify_all()
            except OSError:
                pass
            with cond:
                state["eof"] = True
                cond.notify_all()

        def deliver() -> None:
            try:
                while True:
                    with cond:
                        while not due and not state["eof"]:
                            cond.wait()
                        if not due:
                            break
                        at, _, data = due[0]
                        wait = at - time.monotonic()
                        if wait > 0:
                            cond.wait(wait)
                            continue
                        heapq.heappop(due)
                        state["queued"] -= len(data)
                        cond.notify_all()
                    dst.sendall(data)
                    self.bytes[direction] += len(data)
            except OSError:
                pass
            hang_up(src, dst)

        threading.Thread(target=read, daemon=True, name=f"shaper-{direction}-read").start()
        threading.Thread(target=deliver, daemon=True, name=f"shaper-{direction}-send").start()


def hang_up(*socks: socket.socket) -> None:
    """Shut both directions of each socket and close it, whatever state it is in."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
