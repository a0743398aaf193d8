"""What the server saw of each worker — last message, recent fits, bytes both ways — and the one
plain-Python view of the workers that `ListWorkers`, `colaflow workers` and the status page show.
For operators only: nothing here steers scheduling."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from colaflow.records import LIVE
from colaflow.scheduler import Scheduler

FITS_WINDOW_S = 10.0


@dataclass
class Traffic:
    last_seen: float = 0.0  # time.time() of its last message (heartbeats included)
    fits: deque = field(default_factory=deque)  # when its updates of the last FITS_WINDOW_S arrived
    bytes_in: int = 0
    bytes_out: int = 0


def forget_old(fits: deque, now: float) -> None:
    """Keep only the fits of the last FITS_WINDOW_S seconds (what fits_per_s counts)."""
    while fits and fits[0] <= now - FITS_WINDOW_S:
        fits.popleft()


def workers_view(scheduler: Scheduler, traffic: dict[str, Traffic], now: float) -> list[dict]:
    """One map per worker, sorted by id: worker, state (connected, unhealthy: why, disconnected,
    quarantined: why), last_seen_s (None: never), sites {job: [site, ...]} it owns in live jobs,
    fits_per_s (updates over the last 10 s), bytes_in, bytes_out (Work stream bytes)."""
    out = []
    for wid, w in sorted(scheduler.workers.items()):
        sites: dict[str, list[str]] = {}
        for job_id, job in scheduler.jobs.items():
            mine = [n for n, r in job.sites.items() if r.owner == wid]
            if mine and job.state in LIVE:
                sites[job_id] = mine
        t = traffic.get(wid, Traffic())
        forget_old(t.fits, now)
        state = (f"quarantined: {w.quarantined}" if w.quarantined else
                 "disconnected" if not w.connected else f"unhealthy: {w.status}" if w.status else "connected")
        out.append({"worker": wid, "state": state,
                    "last_seen_s": round(now - t.last_seen, 1) if t.last_seen else None,
                    "sites": sites, "fits_per_s": round(len(t.fits) / FITS_WINDOW_S, 2),
                    "bytes_in": t.bytes_in, "bytes_out": t.bytes_out})
    return out
