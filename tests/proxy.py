"""A loopback TCP proxy that can cut its first connection after N bytes from the server."""
from __future__ import annotations

import socket
import threading

from colaflow.bench.shaper import hang_up


class CuttingProxy:
    def __init__(self, upstream: str, cut_after: int):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self.upstream)
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()

    def _pump(self, src, dst, limit):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.cuts += 1
                    break  # cut in the middle of whatever was flowing
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        hang_up(src, dst)

    def close(self):
        self.sock.close()
