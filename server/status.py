"""The status page and the operator's HTTP endpoints of `colaflow serve` (stdlib http.server, read-only).

    GET /                          the status page (status.html: inline JS polls the JSON API)
    GET /api/jobs                  jobs the caller sees: state, progress, steps/s, ETA, counters
    GET /api/jobs/JOB/metrics      ?since=N: per-step metrics after the first N
    GET /api/jobs/JOB/metrics.jsonl, .csv   the same, as a download
    GET /api/workers               workers: health, assignment, fits/s, bytes (a tenant: those on its jobs)
    GET /metrics                   Prometheus text exposition (admin only)
    GET /healthz                   liveness: "ok" (no token)
    POST /login                    form field `token`: sets a session cookie; GET any page ?token=T does too

Auth is the gRPC server's tokens: `Authorization: Bearer TOKEN`, or a session cookie that a login
(the form, or `?token=` followed by a redirect that drops it from the address bar) sets. The
cookie holds a random session id, never the token (cookies are not scoped by port), HttpOnly,
SameSite=Strict, Secure under TLS. Without a tokens file every caller is admin, as on gRPC, and
on a loopback address requests must name a loopback Host (a web page cannot reach the page by
DNS rebinding).
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import Identity, Tokens
from .coordinator import Coordinator
from .metrics import finite, job_rate, metrics_csv, metrics_jsonl, metrics_registry

log = logging.getLogger("colaflow.server")
PAGE = Path(__file__).with_name("status.html")
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 10_000
MAX_ROWS = 100_000  # metrics rows per response
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class StatusServer:
    """A ThreadingHTTPServer on its own thread; `url` is what `colaflow serve` prints."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str, str | None] | None = None):
        self.coordinator, self.scheduler, self.tokens, self.host = coordinator, coordinator.scheduler, tokens, host
        self.registry = metrics_registry(coordinator)
        self.sessions: dict[str, tuple[Identity, float]] = {}
        self.lock = threading.Lock()
        server_cls = _Server6 if ":" in host else _Server
        self.httpd = server_cls((host, port), _Handler)
        self.httpd.app = self
        self.port = self.httpd.server_address[1]
        self.secure = tls is not None
        if tls is not None:
            cert, key, client_ca = tls
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            if client_ca:
                ctx.load_verify_locations(client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            # the handshake happens in the request's thread, so a slow client never blocks accept()
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.cookie = f"colaflow_session_{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="colaflow-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}/"

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever, which must have started
            self.httpd.shutdown()
        self.httpd.server_close()

    # auth

    def login(self, token: str) -> str | None:
        """A new session id for a valid control or admin token (None: refused)."""
        identity = self.tokens.identity([("authorization", f"Bearer {token}")])
        if identity is None or identity.role == "worker":
            return None
        now = time.monotonic()
        with self.lock:
            for sid in [s for s, (_, until) in self.sessions.items() if until < now]:
                del self.sessions[sid]
            if len(self.sessions) >= MAX_SESSIONS:  # bounded: the oldest session goes
                del self.sessions[min(self.sessions, key=lambda s: self.sessions[s][1])]
            sid = secrets.token_urlsafe(32)
            self.sessions[sid] = (identity, now + SESSION_S)
        return sid

    def identity(self, authorization: str, cookie: str) -> Identity | None:
        if not self.tokens.enabled:
            return Identity("admin", None, "anonymous")
        if authorization:
            return self.tokens.identity([("authorization", authorization)])
        sid = SimpleCookie(cookie).get(self.cookie)
        with self.lock:
            found = self.sessions.get(sid.value) if sid is not None else None
        return found[0] if found is not None and found[1] > time.monotonic() else None

    # the JSON API (plain functions of the caller's tenant)

    def jobs(self, tenant: str | None) -> dict:
        health, now, jobs = self.coordinator.health(tenant), time.time(), []
        for view in self.scheduler.jobs_view(tenant):
            rate, eta = job_rate(view, now)
            recent = view.pop("recent")
            jobs.append(dict(view, steps_per_s=rate, eta_s=eta, last=recent[-1] if recent else {}))
        return {"server": {"status": health.status, "workers": health.workers, "jobs": health.jobs}, "jobs": jobs}

    def workers(self, tenant: str | None) -> dict:
        """Admin: every worker. A tenant: the workers holding its jobs' sites, with only those sites;
        their rates and byte counts span every job, so a tenant does not get them."""
        workers = self.scheduler.workers_view()
        if tenant is not None:
            mine = {j.job for j in self.scheduler.statuses(tenant)}
            workers = [dict(w, sites={j: s for j, s in w["sites"].items() if j in mine},
                            fits_per_s=None, bytes_in=None, bytes_out=None, detail="")
                       for w in workers if mine & set(w["sites"])]
        return {"workers": workers}

    def metrics_rows(self, job: str, since: int, tenant: str | None) -> tuple[list[dict], bool]:
        rows, ended = self.scheduler.metrics(job, since, tenant)
        return rows[:MAX_ROWS], ended


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # as gRPC does: only a live listener makes the port taken

    def handle_error(self, request, client_address):  # a client that went away is not worth a traceback
        log.debug("status page: request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "colaflow"
    timeout = 30  # seconds a client may take per read: a slow one cannot hold a thread forever

    @property
    def app(self) -> StatusServer:
        return self.server.app

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        log.debug("status page: %s %s", self.address_string(), format % args)

    def do_GET(self):
        self._serve(self._get)

    def do_POST(self):
        self._serve(self._post)

    def _serve(self, handler) -> None:
        try:
            self._check_host()
            handler(urlsplit(self.path))
        except Refused as e:
            self._error(e.status, str(e))
        except KeyError as e:
            self._error(HTTPStatus.NOT_FOUND, str(e.args[0]) if e.args else "not found")
        except (ValueError, TypeError) as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
        except (ConnectionError, TimeoutError, ssl.SSLError):
            raise  # the client went away: nothing to answer
        except Exception as e:  # a bug: say so in the log, answer 500, keep serving
            log.exception("status page: %s failed", self.path.split("?")[0][:100])
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__} (see the server's log)")

    def _check_host(self) -> None:
        """Without tokens on loopback, only requests naming a loopback host: no DNS rebinding."""
        if self.app.tokens.enabled or self.app.host not in LOOPBACK_NAMES and not self.app.host.startswith("127."):
            return  # tokens guard it; or it was put off loopback without them on purpose (--insecure)
        host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        if host not in LOOPBACK_NAMES | {self.app.host}:
            raise Refused(HTTPStatus.FORBIDDEN, f"Host {host[:64]!r} is not this server's (a server without "
                                                "tokens answers only requests naming its own address)")

    def _caller(self, path: str) -> Identity:
        identity = self.app.identity(self.headers.get("Authorization", ""), self.headers.get("Cookie", ""))
        if identity is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, "this page needs a control or admin token: "
                                                   "`Authorization: Bearer TOKEN`, or log in")
        if identity.role == "worker":
            raise Refused(HTTPStatus.FORBIDDEN, "a worker token cannot read the status page")
        if path == "/metrics" and identity.role != "admin":
            raise Refused(HTTPStatus.FORBIDDEN, "/metrics needs an admin token")
        return identity

    def _get(self, url) -> None:
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            return self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        if "token" in query:  # log in, then drop the token from the address bar (and the history's next entry)
            return self._login(query["token"][0], path + self._without_token(query))
        identity = self._caller(path)
        tenant = identity.tenant
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            page = PAGE.read_text().replace("{{nonce}}", nonce)
            return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8", nonce=nonce)
        if path == "/metrics":
            return self._send(HTTPStatus.OK, generate_latest(self.app.registry), CONTENT_TYPE_LATEST)
        if path == "/api/jobs":
            return self._json(self.app.jobs(tenant))
        if path == "/api/workers":
            return self._json(self.app.workers(tenant))
        if path.startswith("/api/jobs/"):
            job, _, what = unquote(path[len("/api/jobs/"):]).rpartition("/")
            if what == "metrics":
                since = self._int(query, "since")
                rows, ended = self.app.metrics_rows(job, since, tenant)
                return self._json({"job": job, "since": since, "metrics": rows, "ended": ended})
            if what in ("metrics.jsonl", "metrics.csv"):
                rows, _ = self.app.metrics_rows(job, 0, tenant)
                body = metrics_jsonl(rows) if what.endswith("jsonl") else metrics_csv(rows)
                kind = "application/x-ndjson" if what.endswith("jsonl") else "text/csv; charset=utf-8"
                name = quote(f"{job}-{what}", safe="")
                return self._send(HTTPStatus.OK, body.encode(), kind,
                                  disposition=f"attachment; filename*=UTF-8''{name}")
        raise Refused(HTTPStatus.NOT_FOUND, f"no such page: {path[:100]}")

    def _post(self, url) -> None:
        if url.path != "/login":
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, "the status page is read-only")
        n = int(self.headers.get("Content-Length") or 0)
        if not 0 <= n <= 4096:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "a login form is at most 4096 bytes")
        form = parse_qs(self.rfile.read(n).decode("utf-8", "replace"))
        self._login((form.get("token") or [""])[0], "/")

    def _login(self, token: str, then: str) -> None:
        sid = self.app.login(token) if self.app.tokens.enabled else ""
        if sid is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, "unknown token, or a worker token (the page needs control "
                                                   "or admin)")
        self.send_response(HTTPStatus.SEE_OTHER)
        if sid:
            secure = "; Secure" if self.app.secure else ""
            self.send_header("Set-Cookie", f"{self.app.cookie}={sid}; Path=/; HttpOnly; SameSite=Strict; "
                                           f"Max-Age={int(SESSION_S)}{secure}")
        self.send_header("Location", then)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    @staticmethod
    def _without_token(query: dict) -> str:
        rest = "&".join(f"{quote(k)}={quote(v)}" for k, vs in query.items() if k != "token" for v in vs)
        return f"?{rest}" if rest else ""

    @staticmethod
    def _int(query: dict, name: str) -> int:
        raw = (query.get(name) or ["0"])[0]
        if not raw.isdigit():
            raise ValueError(f"`{name}` must be an integer >= 0, got {raw[:32]!r}")
        return int(raw)

    def _json(self, obj) -> None:
        self._send(HTTPStatus.OK, json.dumps(finite(obj)).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        if status == HTTPStatus.UNAUTHORIZED and self.path.split("?")[0] == "/":
            page = LOGIN.replace("{{message}}", _escape(message)).encode()
            return self._send(status, page, "text/html; charset=utf-8")
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str, nonce: str = "", disposition: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        src = f"'nonce-{nonce}'" if nonce else "'none'"
        self.send_header("Content-Security-Policy", f"default-src 'none'; script-src {src}; style-src {src}; "
                                                    "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                                                    "frame-ancestors 'none'; base-uri 'none'")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="colaflow"')
        if disposition:
            self.send_header("Content-Disposition", disposition)
        self.end_headers()
        self.wfile.write(body)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>colaflow: log in</title></head>
<body><h1>colaflow</h1><p>{{message}}</p>
<form method="post" action="/login"><label>token <input type="password" name="token" autofocus></label>
<button type="submit">log in</button></form></body></html>
"""
