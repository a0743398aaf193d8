"""The operator's surface of `colaflow serve`, on a real server process with a real edge daemon:
the status page rendered by headless Chromium, its JSON API and auth, the Prometheus scrape
(parsed by prometheus_client's own parser), the metrics files, gRPC health and reflection."""
from __future__ import annotations

import csv
import http.client
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from colaflow import JobSpec, LowRank
from colaflow.control.protocol import Hello
from colaflow.engine.host import Host
from colaflow.engine.weights import describe
from colaflow.models import tiny
from colaflow.wire.client import Client
from procs import examples, start_edge, start_server, stop, wait_done

TOKENS = {"admin": "admin-token-0000000000", "acme": "acme-control-token-00", "globex": "globex-control-token-0",
          "worker": "worker-pool-token-0000"}
STEPS = {"acme-job": 6, "globex-job": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with tokens and one edge daemon; acme and globex each ran a job to the end."""
    work = tmp_path_factory.mktemp("status")
    (work / "tokens.txt").write_text(f"{TOKENS['admin']} admin\n{TOKENS['acme']} control acme\n"
                                     f"{TOKENS['globex']} control globex\n{TOKENS['worker']} worker\n")
    (work / "worker.token").write_text(TOKENS["worker"])
    tensorboard = ("--tensorboard", str(work / "tb")) if importlib.util.find_spec("tensorboard") else ()
    server, address = start_server(work, "--tokens", str(work / "tokens.txt"), *tensorboard)
    line = server.stdout.readline()  # printed after "listening on", as Ray prints its dashboard's
    m = re.fullmatch(r"colaflow serve: status page at (http://127\.0\.0\.1:\d+/)\n", line)
    assert m, line
    edge = start_edge(work, address, "e1", "--token-file", str(work / "worker.token"))
    clients = {t: Client(address, token=TOKENS[t]) for t in ("admin", "acme", "globex")}
    try:
        for tenant, job in (("acme", "acme-job"), ("globex", "globex-job")):
            clients[tenant].submit(JobSpec(job, LowRank(r=2)), examples(96, 16, 1), steps=STEPS[job], batch_size=4)
        for tenant, job in (("acme", "acme-job"), ("globex", "globex-job")):
            assert wait_done(clients[tenant], job).state == "done"
        yield {"url": m.group(1), "address": address, "clients": clients, "work": work}
    finally:
        for c in clients.values():
            c.close()
        stop(edge, server)


def fetch(url: str, token: str | None = None, cookie: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET that follows no redirect."""
    parts = urllib.request.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def api(served, path: str, who: str = "admin"):
    status, _, body = fetch(served["url"] + path, TOKENS[who])
    assert status == 200, (path, who, status, body)
    return json.loads(body)


# the page in a real browser

class Cells(HTMLParser):
    """Text of every <td class=…> cell, per row `data-job` / `data-worker`; and the charts' keys."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.charts: list[str] = []
        self.ready = False
        self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body" and a.get("data-ready") == "1":
            self.ready = True
        if tag == "tr" and ("data-job" in a or "data-worker" in a):
            self._row = self.rows.setdefault(a.get("data-job") or a["data-worker"], {})
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split()[-1]
            self._row[self._cell] = ""
        elif tag == "svg" and "data-key" in a:
            self.charts.append(a["data-key"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--virtual-time-budget=15000", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_status_page_renders_the_servers_real_data_in_headless_chromium(served, tmp_path):
    login = served["url"] + f"?token={TOKENS['admin']}"  # sets a session cookie, then drops the token
    out = chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", login)
    page = Cells()
    page.feed(out.stdout)
    assert page.ready, out.stdout[-2000:] + out.stderr[-2000:]
    for job, steps in STEPS.items():  # the jobs the server ran, as the server knows them
        row = page.rows[job]
        assert row["state"] == "done" and row["step"] == f"{steps} / {steps}", row
        status = served["clients"]["admin"].get(job)
        assert row["loss"] == str(float(f"{status.loss:.4g}")), (row, status.loss)
    assert page.rows["e1"]["state"] == "connected"
    assert page.charts.count("loss") == 2  # one loss curve per job
    assert "model float32 on cpu" in out.stdout  # what the server holds, in the header

    png = tmp_path / "status.png"
    out = chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={png}", "--window-size=1280,800",
                   login)
    assert png.exists(), out.stderr[-2000:]
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 800)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is blank"  # None: more colours than that
    dark = sum(n for n, (r, g, b) in (colours or []) if r + g + b < 300)
    assert colours is None or dark > 500, "no text or lines drawn"


# auth and tenancy

def test_the_page_needs_a_token_and_a_tenant_sees_only_its_own(served):
    url = served["url"]
    for path in ("", "api/jobs", "api/workers", "api/jobs/acme-job/metrics", "metrics"):
        status, headers, _ = fetch(url + path)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
    status, _, body = fetch(url)
    assert status == 401 and b'action="/login"' in body  # a browser gets the login form
    assert fetch(url + "healthz")[:1] == (200,)  # liveness needs no token

    assert [j["job"] for j in api(served, "api/jobs", "acme")["jobs"]] == ["acme-job"]
    assert {j["job"] for j in api(served, "api/jobs", "admin")["jobs"]} == set(STEPS)
    assert api(served, "api/jobs", "acme")["server"]["jobs"] == 1
    held = describe(tiny("llama"))  # the model `--model tiny-llama` holds
    model = api(served, "api/jobs", "admin")["server"]["model"]
    assert (model["dtype"], model["quantization"], model["devices"]) == ("float32", "none", ["cpu"])
    assert model["weight_bytes"] == held["weight_bytes"] and model["promised_step"] == 0  # its jobs have ended
    assert model["max_memory"] > model["weight_bytes"]  # the machine's memory: no --max-memory
    mine = api(served, "api/jobs", "acme")["server"]["model"]  # a tenant: the model, not others' promises
    assert mine == {k: model[k] for k in ("dtype", "quantization", "devices", "weight_bytes")}
    status, _, body = fetch(url + "api/jobs/globex-job/metrics", TOKENS["acme"])
    assert status == 404 and json.loads(body) == {"error": "unknown job 'globex-job'"}  # as if it did not exist
    status, _, body = fetch(url + "api/jobs/globex-job/metrics.csv", TOKENS["acme"])
    assert status == 404
    status, _, body = fetch(url + "metrics", TOKENS["acme"])
    assert status == 403 and b"admin" in body
    for path in ("", "api/jobs", "metrics"):
        assert fetch(url + path, TOKENS["worker"])[0] == 403, path
    assert fetch(url + "api/jobs", "not-a-token-at-all-xx")[0] == 401


def test_a_token_in_the_url_becomes_an_http_only_cookie_and_leaves_the_address(served):
    status, headers, _ = fetch(served["url"] + f"api/jobs?token={TOKENS['acme']}&x=1")
    assert status == 303 and headers["location"] == "/api/jobs?x=1"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKENS["acme"] not in cookie
    session = cookie.split(";")[0]
    status, _, body = fetch(served["url"] + "api/jobs", cookie=session)
    assert status == 200 and [j["job"] for j in json.loads(body)["jobs"]] == ["acme-job"]
    assert fetch(served["url"] + "api/jobs", cookie=session + "x")[0] == 401
    assert fetch(served["url"] + f"?token={TOKENS['worker']}")[0] == 401  # workers do not log in


# metrics

def test_metrics_scrape_parses_and_tells_the_truth(served):
    status, headers, body = fetch(served["url"] + "metrics", TOKENS["admin"])
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["colaflow_job_steps"].type == "counter" and families["colaflow_workers"].type == "gauge"
    assert families["colaflow_step_seconds"].type == "histogram"
    samples = [s for f in families.values() for s in f.samples]
    value = lambda name, **labels: next(s.value for s in samples  # noqa: E731
                                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    jobs = {j["job"]: j for j in api(served, "api/jobs")["jobs"]}
    for job, steps in STEPS.items():
        assert value("colaflow_job_steps_total", job=job) == served["clients"]["admin"].get(job).step == steps
        assert value("colaflow_job_sent_bytes_total", job=job) == jobs[job]["bytes_sent"] > 0
        assert value("colaflow_job_fits_total", job=job) == jobs[job]["fits"] == 4 * steps  # 4 sites, I = 1
    assert value("colaflow_jobs", state="done") == 2 and value("colaflow_jobs", state="running") == 0
    assert value("colaflow_steps_per_second") == 0 == value("colaflow_job_steps_per_second", job="acme-job")
    assert jobs["acme-job"]["steps_per_s"] > 0 and jobs["acme-job"]["eta_s"] is None  # its pace, and it is done
    connected = served["clients"]["admin"].health().workers
    assert value("colaflow_workers", state="connected") == connected == 1
    assert value("colaflow_serving") == 1
    held = api(served, "api/jobs")["server"]["model"]
    assert value("colaflow_model_weight_bytes", dtype="float32", quantization="none", where="all") \
        == held["weight_bytes"] == describe(tiny("llama"))["weight_bytes"]
    assert value("colaflow_memory_bytes", what="budget") == held["max_memory"]
    assert value("colaflow_worker_sent_bytes_total", worker="e1") == sum(j["bytes_sent"] for j in jobs.values())
    buckets = [(float(s.labels["le"]), s.value) for s in families["colaflow_step_seconds"].samples
               if s.name == "colaflow_step_seconds_bucket"]
    counts = [n for _, n in sorted(buckets)]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")  # cumulative: monotone
    assert counts[-1] == value("colaflow_step_seconds_count") == sum(STEPS.values())
    # a second scrape counts no step twice
    again = {f.name: f for f in text_string_to_metric_families(fetch(served["url"] + "metrics", TOKENS["admin"])[2]
                                                                .decode())}
    assert next(s.value for s in again["colaflow_step_seconds"].samples
                if s.name == "colaflow_step_seconds_count") == sum(STEPS.values())


def test_per_job_metrics_download_as_jsonl_and_csv(served):
    want = served["clients"]["acme"].metrics_so_far("acme-job")
    status, headers, body = fetch(served["url"] + "api/jobs/acme-job/metrics.jsonl", TOKENS["acme"])
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert [json.loads(line) for line in body.decode().splitlines()] == want
    status, _, body = fetch(served["url"] + "api/jobs/acme-job/metrics.csv", TOKENS["acme"])
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [int(r["step"]) for r in rows] == list(range(STEPS["acme-job"]))
    assert [float(r["loss"]) for r in rows] == [m["loss"] for m in want]
    since = api(served, "api/jobs/acme-job/metrics?since=4", "acme")
    assert since["ended"] and [m["step"] for m in since["metrics"]] == [4, 5]
    status, _, body = fetch(served["url"] + "api/jobs/acme-job/metrics?since=-1", TOKENS["acme"])
    assert status == 400 and b"`since` must be an integer" in body


# gRPC health and reflection: no token, nothing about jobs

def test_grpc_health_and_reflection_answer_without_a_token(served):
    with grpc.insecure_channel(served["address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "colaflow.v1.Control", "colaflow.v1.Worker"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="acme-job"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10)
        names = {s.name for s in answer.list_services_response.service}
        assert {"colaflow.v1.Control", "colaflow.v1.Worker", "grpc.health.v1.Health"} <= names
        [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="colaflow.v1.Control")]), timeout=10)
        assert answer.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_grpc_health_says_not_serving_while_the_state_dir_fails_and_serving_again():
    from test_hardening import FlakyStore

    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.service import make_server

    store = FlakyStore()
    c = Coordinator(Host(tiny("llama")), store=store)
    server, port = make_server(c, Tokens(None))
    server.probes.interval = 0.1
    server.start()
    loop = threading.Thread(target=c.run, daemon=True)
    loop.start()
    seen: list[int] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="colaflow.v1.Worker"), timeout=60)

            def follow() -> None:
                try:
                    for r in watch:
                        seen.append(r.status)
                except grpc.RpcError:  # cancelled at the end
                    pass
            watcher = threading.Thread(target=follow, daemon=True)
            watcher.start()
            check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status  # noqa: E731
            assert check() == health_pb2.HealthCheckResponse.SERVING
            store.full = True
            c.submit(JobSpec("j", LowRank(r=2)), {"examples": examples(96, 8, 0), "batch_size": 4}, steps=2)
            assert c.health().status.startswith("state dir failing")
            wait_for(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING)
            store.full = False  # the back-off retries, the write goes through, the loop can go on
            wait_for(lambda: check() == health_pb2.HealthCheckResponse.SERVING)
            wait_for(lambda: len(seen) >= 3)
            watch.cancel()
    finally:
        c.stop()
        server.stop(0)
    S, N = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen[:3] == [S, N, S]


def wait_for(cond, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


# the workers' view (shared with `colaflow workers`), on plain objects

def test_workers_view_shows_assignment_health_and_a_tenant_only_its_sites():
    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.status import StatusServer

    c = Coordinator(Host(tiny("llama")))
    data = {"examples": examples(96, 8, 0), "batch_size": 4}
    c.submit(JobSpec("a-job", LowRank(r=2)), data, steps=2, tenant="acme")
    c.submit(JobSpec("b-job", LowRank(r=2)), data, steps=2, tenant="globex")
    stream = c.scheduler.connect("w1", c.scheduler.register("w1", {}, "cred"), Hello())
    c.scheduler.heard("w1")  # as the Work stream says of every frame
    c.scheduler.count_bytes("a-job", "w1", sent=1000)
    [w] = c.scheduler.workers_view()
    assert w["worker"] == "w1" and w["state"] == "connected" and 0 <= w["last_seen_s"] < 5
    assert {j: len(s) for j, s in w["sites"].items()} == {"a-job": 4, "b-job": 4}  # tiny llama: 2 layers x q, v
    assert w["bytes_out"] == 1000 and w["bytes_in"] == 0 and w["fits_per_s"] == 0.0
    c.scheduler.worker_status("w1", stream, "disk full")
    [w] = c.scheduler.workers_view()
    assert w["state"] == "unhealthy" and w["detail"] == "disk full"

    page = StatusServer(c, Tokens(None))
    try:
        [mine] = page.workers("acme")["workers"]
        assert set(mine["sites"]) == {"a-job"} and mine["bytes_out"] is None and mine["fits_per_s"] is None
        assert page.workers(None)["workers"][0]["bytes_out"] == 1000
    finally:
        page.stop()
    c.scheduler.disconnect("w1", stream)
    assert c.scheduler.workers_view()[0]["state"] == "disconnected"


# TensorBoard

def test_tensorboard_gets_every_jobs_metrics_as_scalars(served):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = served["clients"]["acme"].metrics_so_far("acme-job")
    def written():
        acc = EventAccumulator(str(served["work"] / "tb" / "acme-job"))
        acc.Reload()
        return acc.Scalars("loss") if "loss" in acc.Tags()["scalars"] else []
    wait_for(lambda: len(written()) == len(want))
    got = written()
    assert [e.step for e in got] == [m["step"] for m in want]
    assert [e.value for e in got] == pytest.approx([m["loss"] for m in want], rel=1e-6)  # stored as float32


def test_tensorboard_without_the_package_stops_the_server_at_start_saying_what_to_install(tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None; from colaflow.cli.main import main; "
            f"sys.exit(main(['serve', '--model', 'tiny-llama', '--port', '0', '--tensorboard', {str(tmp_path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--tensorboard needs the `tensorboard` package: pip install tensorboard" in out.stderr
    assert "listening" not in out.stdout


def test_under_tls_the_page_is_https_only_and_its_cookie_secure(tmp_path):
    import ssl

    from test_wire_security import _certs

    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.status import StatusServer

    certs = _certs(tmp_path)
    c = Coordinator(Host(tiny("llama")))
    page = StatusServer(c, Tokens({TOKENS["admin"]: ("admin", None)}), "127.0.0.1", 0,
                        (str(certs["cert"]), str(certs["key"]), None)).start()
    try:
        assert page.url == f"https://127.0.0.1:{page.port}/"
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        conn = http.client.HTTPSConnection("127.0.0.1", page.port, context=ctx, timeout=30)
        conn.request("GET", f"/?token={TOKENS['admin']}")
        r = conn.getresponse()
        r.read()
        assert r.status == 303 and "; Secure" in r.getheader("Set-Cookie")
        conn.request("GET", "/api/jobs", headers={"Authorization": f"Bearer {TOKENS['admin']}"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["jobs"] == []
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)  # plaintext gets no page
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/healthz")
            plain.getresponse().read()
    finally:
        page.stop()


def test_a_taken_http_port_stops_the_server_before_the_model_loads():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "colaflow.cli.main", "serve", "--model", "no-such-model",
                              "--port", "0", "--http-port", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "--http-port off" in out.stderr and "Traceback" not in out.stderr


def test_without_tokens_on_loopback_only_loopback_host_names_are_answered():
    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.status import StatusServer

    page = StatusServer(Coordinator(Host(tiny("llama"))), Tokens(None)).start()  # every caller is admin
    try:
        def get(host: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
            conn.request("GET", "/api/jobs", headers={"Host": host})
            status = conn.getresponse().status
            conn.close()
            return status
        assert get(f"127.0.0.1:{page.port}") == 200 and get(f"localhost:{page.port}") == 200
        assert get(f"evil.example:{page.port}") == 403  # a DNS-rebound page in the operator's browser
    finally:
        page.stop()


def test_grpc_health_is_not_serving_once_the_step_loop_gave_up(monkeypatch):
    import asyncio

    from colaflow.server.coordinator import Coordinator
    from colaflow.server.probes import NOT_SERVING, SERVING, Probes

    c = Coordinator(Host(tiny("llama")))
    probes = Probes(c)
    assert asyncio.run(probes.update()) == SERVING
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(c, "step_once", lambda: 1 / 0)
    c.run(max_failures=2)  # gives up: `colaflow serve` exits non-zero, and says so until then
    assert c.fatal and asyncio.run(probes.update()) == NOT_SERVING
    assert asyncio.run(probes.health.Check(health_pb2.HealthCheckRequest(service="colaflow.v1.Control"), None)) \
        .status == NOT_SERVING
