"""A small HTTP/1.1 server on asyncio for the status page, bounded so that no stranger can take the
process's threads or descriptors.

    server = HttpServer(handle, "127.0.0.1", 0, ssl_context=None)   # handle(Request) -> Response
    server.start(); server.port; ...; server.stop()

One event-loop thread holds every connection (no thread per connection); `handle` runs on a pool
of `workers` threads. At most `max_connections` are open at once (an eighth of the process's
open-file limit, at most 256; while an evicted one closes, up to twice that), so the page never
takes the descriptors the gRPC port needs. When all are taken, a new connection evicts the one that
has waited longest for its request (a client trickling its headers, an idle keep-alive), or, when
every one is being answered, gets a 503 at once. A request — TLS handshake, head and body — must
arrive within `request_s` of the moment the server starts waiting for it; its head may hold 16 KiB,
its body 4 KiB (no chunked bodies); the client must take the answer within `write_s`.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

log = logging.getLogger("colaflow.server")
MAX_HEAD = 16 << 10
MAX_BODY = 4096
MAX_HEADERS = 64
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")


@dataclass
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # names lower-case; a repeated header keeps its first value
    body: bytes = b""
    keep_alive: bool = False


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def default_max_connections() -> int:
    """An eighth of the open-file limit (the rest is the gRPC port's), between 16 and 256."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 256 if soft == resource.RLIM_INFINITY else max(16, min(256, soft // 8))


@dataclass(eq=False)
class _Conn:
    since: float  # when the server began waiting for its request (loop time)
    reading: bool = True  # False while its request is being answered (not evictable then)
    evicted: bool = False  # told to close: counted until it has
    owned: bool = False  # asyncio's transport owns the socket (and closes it)
    task: asyncio.Task | None = None


class HttpServer:
    def __init__(self, handle: Callable[[Request], Response], host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int | None = None,
                 request_s: float = 10.0, write_s: float = 30.0, workers: int = 4):
        self.handle, self.ssl = handle, ssl_context
        self.max_connections = max_connections or default_max_connections()
        self.request_s, self.write_s = request_s, write_s
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: only a live listener counts
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="colaflow-http-handler")
        self.conns: list[_Conn] = []
        self.thread = threading.Thread(target=self._run, name="colaflow-http", daemon=True)

    def start(self) -> HttpServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.sock.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._accepting = self.loop.create_task(self._accept())
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _shutdown(self) -> None:
        self._accepting.cancel()
        tasks = [c.task for c in self.conns if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(self._accepting, *tasks, return_exceptions=True)

    async def _accept(self) -> None:
        while True:
            try:
                sock, _ = await self.loop.sock_accept(self.sock)
            except OSError as e:  # out of descriptors (EMFILE): wait for some to come back
                log.warning("status page: cannot accept a connection: %s", e)
                await asyncio.sleep(0.1)
                continue
            open_ = sum(not c.evicted for c in self.conns)
            if len(self.conns) >= 2 * self.max_connections or open_ >= self.max_connections and not self._evict():
                _refuse(sock)
            else:
                conn = _Conn(self.loop.time())
                self.conns.append(conn)
                conn.task = self.loop.create_task(self._serve(sock, conn))
            await asyncio.sleep(0)  # let evicted connections close and new ones read before the next accept

    def _evict(self) -> bool:
        """Close the connection that has waited longest for its request; False if all are being answered."""
        waiting = [c for c in self.conns if c.reading and not c.evicted and c.task is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.since)
        oldest.evicted = True  # still counted: its descriptor is free only once its task has closed it
        oldest.task.cancel()
        return True

    async def _serve(self, sock: socket.socket, conn: _Conn) -> None:
        transport = None
        try:
            reader = asyncio.StreamReader(limit=MAX_HEAD, loop=self.loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)

            def made() -> asyncio.StreamReaderProtocol:
                conn.owned = True  # from here the transport closes the socket, also when its start fails
                return protocol
            transport, _ = await self.loop.connect_accepted_socket(
                made, sock, ssl=self.ssl, ssl_handshake_timeout=self.request_s if self.ssl else None)
            writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
            while True:
                conn.reading = True
                left = conn.since + self.request_s - self.loop.time()
                try:
                    request = await asyncio.wait_for(_read_request(reader), max(left, 0.0))
                except BadRequest as e:
                    writer.write(_encode(Response(e.status, [("Content-Type", "text/plain; charset=utf-8")],
                                                  f"{e}\n".encode()), False))
                    await asyncio.wait_for(writer.drain(), self.write_s)
                    return
                if request is None:  # the client closed between requests
                    return
                conn.reading = False
                response = await self.loop.run_in_executor(self.pool, self._answer, request)
                writer.write(_encode(response, request.keep_alive))
                await asyncio.wait_for(writer.drain(), self.write_s)
                if not request.keep_alive:
                    return
                conn.since = self.loop.time()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError,
                ssl.SSLError, OSError):
            pass  # too slow, gone, or evicted: nothing to answer
        finally:
            if transport is not None:
                transport.abort()
            elif not conn.owned:
                sock.close()
            if conn in self.conns:
                self.conns.remove(conn)

    def _answer(self, request: Request) -> Response:
        try:
            return self.handle(request)
        except Exception:  # a bug: the handler answers its own errors
            log.exception("status page: %s failed", request.target.split("?")[0][:100])
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, [("Content-Type", "text/plain")], b"internal error\n")


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise BadRequest(HTTPStatus.BAD_REQUEST, "the request ended inside its head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"a request head may hold {MAX_HEAD} bytes") \
            from None
    lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[1]:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"a request may carry {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        headers.setdefault(name.lower(), value.strip())
    if "transfer-encoding" in headers:
        raise BadRequest(HTTPStatus.NOT_IMPLEMENTED, "request bodies must carry a Content-Length, not chunks")
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a request body may hold {MAX_BODY} bytes, "
                                                              f"got Content-Length {length[:20]!r}")
    body = await reader.readexactly(int(length)) if int(length) else b""
    connection = headers.get("connection", "").lower()
    keep = connection != "close" if parts[2] == "HTTP/1.1" else connection == "keep-alive"
    return Request(parts[0], parts[1], headers, body, keep)


def _encode(r: Response, keep_alive: bool) -> bytes:
    status = HTTPStatus(r.status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: colaflow", f"Date: {formatdate(usegmt=True)}",
             *(f"{k}: {v}" for k, v in r.headers), f"Content-Length: {len(r.body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + r.body


def _refuse(sock: socket.socket) -> None:
    try:
        sock.setblocking(False)
        sock.send(BUSY)
    except OSError:
        pass
    finally:
        sock.close()
