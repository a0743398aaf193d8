"""The status page and the operator's HTTP endpoints of `colaflow serve` (read-only; served by http.py).

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
SameSite=Strict, Secure under TLS. A login must come from this site (its `Origin`, `Referer` and
`Sec-Fetch-Site` say so, or are absent as with curl): another site cannot log a visitor's browser
into its own session; and a login redirects only to one of this page's own paths. Without a tokens
file every caller is admin, as on gRPC, and on a loopback address requests must name a loopback
Host (a web page cannot reach the page by DNS rebinding). Connections, and the time and bytes of a
request, are bounded by `http.HttpServer`.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import ssl
import threading
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import Identity, Tokens
from .coordinator import Coordinator
from .http import HttpServer, Request, Response
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
    """The page's routes and sessions on an `HttpServer` (its own event-loop thread); `url` is what
    `colaflow serve` prints. `max_connections` and `request_s` bound the HTTP side (see http.py)."""

    def __init__(self, coordinator: Coordinator, tokens: Tokens, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str, str | None] | None = None, max_connections: int | None = None,
                 request_s: float = 10.0):
        self.coordinator, self.scheduler, self.tokens, self.host = coordinator, coordinator.scheduler, tokens, host
        self.registry = metrics_registry(coordinator)
        self.sessions: dict[str, tuple[Identity, float]] = {}
        self.lock = threading.Lock()
        self.secure = tls is not None
        ctx = None
        if tls is not None:
            cert, key, client_ca = tls
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            if client_ca:
                ctx.load_verify_locations(client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        self.http = HttpServer(self.handle, host, port, ctx, max_connections, request_s)
        self.port = self.http.port
        self.cookie = f"colaflow_session_{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}/"

    def start(self) -> StatusServer:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def handle(self, request: Request) -> Response:
        """The answer to one request (on one of the HTTP server's handler threads)."""
        return _Exchange(self, request).answer()

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
        model = self.coordinator.host.held()
        if tenant is not None:  # the memory promised spans every tenant's jobs
            model = {k: model[k] for k in ("dtype", "quantization", "devices", "weight_bytes")}
        return {"server": {"status": health.status, "workers": health.workers, "jobs": health.jobs, "model": model},
                "jobs": jobs}

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


ROUTE = re.compile(r"/(metrics|api/jobs|api/workers|api/jobs/[A-Za-z0-9._~%-]+/metrics(\.jsonl|\.csv)?)?")


class _Exchange:
    """One request's answer: the routes of the page, as plain methods of the request."""

    def __init__(self, app: StatusServer, request: Request):
        self.app, self.request, self.headers = app, request, request.headers
        self.url = urlsplit(request.target)

    def answer(self) -> Response:
        try:
            self._check_host()
            if self.request.method == "GET":
                return self._get(self.url)
            if self.request.method == "POST":
                return self._post(self.url)
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.request.method[:16]!r} is not served here")
        except Refused as e:
            return self._error(e.status, str(e))
        except KeyError as e:
            return self._error(HTTPStatus.NOT_FOUND, str(e.args[0]) if e.args else "not found")
        except (ValueError, TypeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:  # a bug: say so in the log, answer 500, keep serving
            log.exception("status page: %s failed", self.url.path[:100])
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__} (see the server's log)")

    def _check_host(self) -> None:
        """Without tokens on loopback, only requests naming a loopback host: no DNS rebinding."""
        if self.app.tokens.enabled or self.app.host not in LOOPBACK_NAMES and not self.app.host.startswith("127."):
            return  # tokens guard it; or it was put off loopback without them on purpose (--insecure)
        host = urlsplit("//" + (self.headers.get("host") or "")).hostname or ""
        if host not in LOOPBACK_NAMES | {self.app.host}:
            raise Refused(HTTPStatus.FORBIDDEN, f"Host {host[:64]!r} is not this server's (a server without "
                                                "tokens answers only requests naming its own address)")

    def _same_site(self) -> None:
        """A login must come from this site's own page (or from no page: a typed address, curl): a
        cross-site form or link must not log a victim's browser into someone else's session."""
        fetch_site = self.headers.get("sec-fetch-site", "")
        if fetch_site and fetch_site not in ("same-origin", "none"):
            raise Refused(HTTPStatus.FORBIDDEN, f"a login from another site ({fetch_site}) is refused: open this "
                                                "server's page and log in there")
        own = f"{'https' if self.app.secure else 'http'}://{(self.headers.get('host') or '').lower()}"
        origin = self.headers.get("origin")
        referer = self.headers.get("referer")
        if origin is not None:
            seen = origin.lower()
        elif referer is not None:
            parts = urlsplit(referer)
            seen = f"{parts.scheme}://{parts.netloc}".lower()
        else:
            return
        if seen != own:
            raise Refused(HTTPStatus.FORBIDDEN, f"a login from {seen[:80]!r} is refused: it is not this site "
                                                f"({own[:80]}); open this server's page and log in there")

    def _caller(self, path: str) -> Identity:
        identity = self.app.identity(self.headers.get("authorization", ""), self.headers.get("cookie", ""))
        if identity is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, "this page needs a control or admin token: "
                                                   "`Authorization: Bearer TOKEN`, or log in")
        if identity.role == "worker":
            raise Refused(HTTPStatus.FORBIDDEN, "a worker token cannot read the status page")
        if path == "/metrics" and identity.role != "admin":
            raise Refused(HTTPStatus.FORBIDDEN, "/metrics needs an admin token")
        return identity

    def _get(self, url) -> Response:
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            return self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        if "token" in query:  # log in, then drop the token from the address bar (and the history's next entry)
            self._same_site()
            then = path if ROUTE.fullmatch(path) else "/"  # only this site's own pages: never elsewhere
            return self._login(query["token"][0], then + self._without_token(query))
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

    def _post(self, url) -> Response:
        if url.path != "/login":
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, "the status page is read-only")
        self._same_site()
        form = parse_qs(self.request.body.decode("utf-8", "replace"))
        return self._login((form.get("token") or [""])[0], "/")

    def _login(self, token: str, then: str) -> Response:
        sid = self.app.login(token) if self.app.tokens.enabled else ""
        if sid is None:
            raise Refused(HTTPStatus.UNAUTHORIZED, "unknown token, or a worker token (the page needs control "
                                                   "or admin)")
        headers = [("Location", then), ("Cache-Control", "no-store")]
        if sid:
            secure = "; Secure" if self.app.secure else ""
            headers.append(("Set-Cookie", f"{self.app.cookie}={sid}; Path=/; HttpOnly; SameSite=Strict; "
                                          f"Max-Age={int(SESSION_S)}{secure}"))
        return Response(HTTPStatus.SEE_OTHER, headers)

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

    def _json(self, obj) -> Response:
        return self._send(HTTPStatus.OK, json.dumps(finite(obj)).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> Response:
        if status == HTTPStatus.UNAUTHORIZED and self.url.path == "/" or \
                status == HTTPStatus.FORBIDDEN and message.startswith("a login from"):
            page = LOGIN.replace("{{message}}", _escape(message)).encode()
            return self._send(status, page, "text/html; charset=utf-8")
        return self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str, nonce: str = "", disposition: str = "") -> Response:
        src = f"'nonce-{nonce}'" if nonce else "'none'"
        headers = [("Content-Type", kind), ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Referrer-Policy", "same-origin"),
                   ("Content-Security-Policy", f"default-src 'none'; script-src {src}; style-src {src}; "
                                               "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                                               "frame-ancestors 'none'; base-uri 'none'")]
        if status == HTTPStatus.UNAUTHORIZED:
            headers.append(("WWW-Authenticate", 'Bearer realm="colaflow"'))
        if disposition:
            headers.append(("Content-Disposition", disposition))
        return Response(status, headers, body)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>colaflow: log in</title></head>
<body><h1>colaflow</h1><p>{{message}}</p>
<form method="post" action="/login"><label>token <input type="password" name="token" autofocus></label>
<button type="submit">log in</button></form></body></html>
"""
