"""What the operator reads off a running server: Prometheus metrics, rates and ETAs, metrics files.

Everything here reads the coordinator's locked views (`jobs_view`, `workers_view`, `health`,
`metrics`) at scrape time; nothing is counted twice. The registry is colaflow's own, never
prometheus_client's global one, so two servers in one process (tests) do not mix.

    registry = metrics_registry(coordinator)
    text = prometheus_client.generate_latest(registry)
"""
from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from collections.abc import Iterable

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from colaflow.control.status import ENDED, LIVE
from colaflow.control.views import RATE_WINDOW_S

from .coordinator import Coordinator

# the server's compute per step: tiny models take milliseconds, SmolLM2 on CPU seconds
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def job_rate(view: dict, now: float | None = None) -> tuple[float | None, float | None]:
    """A job's steps/s over its last (up to 20) steps and its ETA in seconds (None: unknown or ended)."""
    times = [m["time"] for m in view["recent"] if isinstance(m.get("time"), (int, float))]
    if len(times) < 2 or times[-1] <= times[0]:
        return None, None
    rate = (len(times) - 1) / (times[-1] - times[0])
    if view["state"] not in LIVE or not view["steps"]:
        return rate, None
    now = time.time() if now is None else now
    left = max(0, view["steps"] - view["step"]) / rate - max(0.0, now - times[-1])  # the next step is under way
    return rate, max(0.0, left)


def finite(value):
    """JSON- and CSV-safe: NaN and infinities become None (JavaScript's JSON.parse refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def metrics_jsonl(rows: list[dict]) -> str:
    """One JSON object per step, in step order."""
    return "".join(json.dumps(finite(r), sort_keys=True) + "\n" for r in rows)


def metrics_csv(rows: list[dict]) -> str:
    """One row per step; columns: every key any step has (`step` first), nested values as JSON."""
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else finite(v) for k, v in r.items()})
    return out.getvalue()


class ServerCollector:
    """A Prometheus collector over the coordinator's views (read at each scrape)."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator, self.scheduler = coordinator, coordinator.scheduler
        self._lock = threading.Lock()  # scrapes may overlap; the histogram state is ours
        self._seen: dict[str, int] = {}  # job -> metrics already folded into the histogram
        self._buckets = [0] * (len(STEP_BUCKETS) + 1)
        self._sum = 0.0

    def _step_seconds(self, jobs: Iterable[str]) -> HistogramMetricFamily:
        with self._lock:
            for job in jobs:
                try:
                    new, _ = self.scheduler.metrics(job, self._seen.get(job, 0))
                except KeyError:
                    continue
                self._seen[job] = self._seen.get(job, 0) + len(new)
                for m in new:
                    s = float(m.get("seconds", 0.0))
                    self._sum += s
                    self._buckets[next((i for i, b in enumerate(STEP_BUCKETS) if s <= b), len(STEP_BUCKETS))] += 1
            cumulative, total = [], 0
            for bound, n in zip([*map(str, STEP_BUCKETS), "+Inf"], self._buckets):
                total += n
                cumulative.append((bound, total))
            h = HistogramMetricFamily("colaflow_step_seconds", "Server compute per step (forward and backward)")
            h.add_metric([], cumulative, self._sum)
            return h

    def collect(self):
        jobs, workers, health = self.scheduler.jobs_view(), self.scheduler.workers_view(), self.coordinator.health()
        yield GaugeMetricFamily("colaflow_serving", "1 while the step loop can go on, else 0",
                                value=float(health.status == "serving"))
        by_state = GaugeMetricFamily("colaflow_jobs", "Jobs by state", labels=["state"])
        for state in (*LIVE, *ENDED):
            by_state.add_metric([state], sum(j["state"] == state for j in jobs))
        yield by_state
        families = {
            "steps": CounterMetricFamily("colaflow_job_steps", "Steps a job has run", labels=["job", "tenant"]),
            "target": GaugeMetricFamily("colaflow_job_steps_target", "Steps a job will run", labels=["job", "tenant"]),
            "rate": GaugeMetricFamily("colaflow_job_steps_per_second", "A job's steps/s over its last 20 steps (0 once "
                                      "it ended or ran no step for 30 s)",
                                      labels=["job", "tenant"]),
            "loss": GaugeMetricFamily("colaflow_job_loss", "A job's last loss", labels=["job", "tenant"]),
            "fits": CounterMetricFamily("colaflow_job_fits", "Updates accepted (one per site per fit)",
                                        labels=["job", "tenant"]),
            "sent": CounterMetricFamily("colaflow_job_sent_bytes", "Packet bytes sent to workers",
                                        labels=["job", "tenant"]),
            "received": CounterMetricFamily("colaflow_job_received_bytes", "Update bytes received from workers",
                                            labels=["job", "tenant"]),
            "retained": GaugeMetricFamily("colaflow_job_packets_retained", "Packets kept until durable learner "
                                          "state covers them", labels=["job", "tenant"]),
            "unsent": GaugeMetricFamily("colaflow_job_packets_unsent", "Retained packets a connected owner has "
                                        "not been sent yet", labels=["job", "tenant"]),
            "stale": GaugeMetricFamily("colaflow_job_max_staleness", "Largest staleness a step used",
                                       labels=["job", "tenant"]),
        }
        now, total = time.time(), 0.0
        for j in jobs:
            labels = [j["job"], j["tenant"]]
            rate, _ = job_rate(j, now)
            last = j["recent"][-1].get("time", 0.0) if j["recent"] else 0.0
            if j["state"] not in LIVE or now - last > RATE_WINDOW_S:
                rate = None  # ended, or no step for a while: it runs at 0 steps/s now
            total += rate or 0.0
            for key, value in (("steps", j["step"]), ("target", j["steps"]), ("rate", rate or 0.0),
                               ("loss", j["loss"]), ("fits", j["fits"]), ("sent", j["bytes_sent"]),
                               ("received", j["bytes_received"]), ("retained", j["packets_retained"]),
                               ("unsent", j["packets_unsent"]), ("stale", j["max_staleness"])):
                families[key].add_metric(labels, float(value))
        yield from families.values()
        yield GaugeMetricFamily("colaflow_steps_per_second", "Steps/s of all live jobs (the sum of "
                                "colaflow_job_steps_per_second)", value=total)
        count = GaugeMetricFamily("colaflow_workers", "Workers by state", labels=["state"])
        for state in ("connected", "unhealthy", "disconnected", "lost", "left", "quarantined"):
            count.add_metric([state], sum(w["state"] == state for w in workers))
        yield count
        w_in = CounterMetricFamily("colaflow_worker_received_bytes", "Update bytes from a worker", labels=["worker"])
        w_out = CounterMetricFamily("colaflow_worker_sent_bytes", "Packet bytes to a worker", labels=["worker"])
        w_rate = GaugeMetricFamily("colaflow_worker_fits_per_second",
                                   f"A worker's fits over the last {RATE_WINDOW_S:.0f} s", labels=["worker"])
        w_sites = GaugeMetricFamily("colaflow_worker_sites", "Sites a worker owns", labels=["worker"])
        for w in workers:
            w_in.add_metric([w["worker"]], float(w["bytes_in"]))
            w_out.add_metric([w["worker"]], float(w["bytes_out"]))
            w_rate.add_metric([w["worker"]], w["fits_per_s"])
            w_sites.add_metric([w["worker"]], float(sum(len(s) for s in w["sites"].values())))
        yield from (w_in, w_out, w_rate, w_sites)
        yield self._step_seconds(j["job"] for j in jobs)
        held = self.coordinator.host.held()
        model = GaugeMetricFamily("colaflow_model_weight_bytes", "Bytes of the frozen model's weights (resident: "
                                  "in memory now, the rest offloaded)", labels=["dtype", "quantization", "where"])
        labels = [held["dtype"], held["quantization"]]
        model.add_metric([*labels, "resident"], float(held["resident_bytes"]))
        model.add_metric([*labels, "all"], float(held["weight_bytes"]))
        yield model
        memory = GaugeMetricFamily("colaflow_memory_bytes", "The memory budget (--max-memory, else the device's) "
                                   "and what admitted jobs are promised of it", labels=["what"])
        for what, key in (("budget", "max_memory"), ("step", "promised_step"), ("packets", "promised_packets")):
            if held[key] is not None:
                memory.add_metric([what], float(held[key]))
        yield memory


def metrics_registry(coordinator: Coordinator) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding the server's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(coordinator))
    return registry
