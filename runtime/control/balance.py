"""Balance: a worker that joins or comes back takes a share of running jobs' sites.

A site moves for balance as it moves for failover — the old owner gets a Revoke, the new one the
durable learner state and the packets kept since, which it replays — so the job's trajectory does
not change (tests/test_faults.py draws joins and returns among its faults). A move costs the new
owner that replay, so a job's sites move for balance at most once per `rebalance_after` seconds,
only a parent module's sites together (as `_assign` places them), only from a connected owner to a
connected, healthy one, and only while it narrows the gap: a group of g sites moves from a worker
with more than g sites (all jobs) above the other's, which also holds at least g more of the job's.
Jobs with `state_every=0` never move for balance: a move would restart their optimizer. A worker
takes a share once it has stayed connected `settle_after` seconds (at once for the sites it still
holds): one that connects and drops again (a flaky link, a confused client) never stalls a job that
was running well elsewhere.
"""
from __future__ import annotations

import logging
import threading

from .records import LIVE, JobRecord, WorkerRecord

log = logging.getLogger("colaflow.scheduler")
REBALANCE_AFTER_S = 60.0  # a move costs the new owner a replay of the kept packets: not more often than this
SETTLE_S = 10.0  # a worker takes a share of running jobs once connected this long


class Balance:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock
    rebalance_after: float = REBALANCE_AFTER_S  # a job's sites move for balance at most once in this many seconds
    settle_after: float = SETTLE_S  # a worker takes a share of running jobs once connected this long
    _balance_at: float | None = None  # when to look at the balance again (None: nothing changed since)

    def _rebalance(self, holds: dict[str, dict[tuple[str, str], int]] | None = None) -> None:
        """Move sites of running jobs onto workers with fewer, if a worker came since the last look (or
        a job's bound has passed). `holds`: per worker, the versions it holds ((job, site) -> version,
        from its Hello): those sites go back to it first, and it keeps its own learner where it is new
        enough."""
        now = self.clock()
        if self._balance_at is None or now < self._balance_at:
            return
        self._balance_at = None
        holds = holds or {}
        live, takers, settling = [], [], []  # sites move from any live worker, onto settled ones
        for w in self.workers.values():
            if w.connected and not w.quarantined and not w.status:
                live.append(w.worker_id)
                settled = now - w.connected_at >= self.settle_after or holds.get(w.worker_id)
                (takers if settled else settling).append(w.worker_id)
        if settling:  # look again once they have settled
            self._balance_at = min(self.workers[k].connected_at for k in settling) + self.settle_after
        live, takers = sorted(live), sorted(takers)
        if len(live) < 2 or not takers:
            return
        load = {wid: self._load(wid) for wid in live}
        for job in self.jobs.values():
            if job.state not in LIVE or not job.spec.state_every:
                continue
            if job.rebalanced_at is not None and now - job.rebalanced_at < self.rebalance_after:
                due = job.rebalanced_at + self.rebalance_after  # look again then
                self._balance_at = due if self._balance_at is None else min(self._balance_at, due)
                continue
            moves = self._spread(job, [k for k in takers if k not in job.slow], load, holds)
            for (src, dst), names in moves.items():
                self._take(job, src, names, f"rebalanced onto worker {dst}")
                for name in names:
                    job.sites[name].owner = dst
                self._send_assign(self.workers[dst], job, names, holds.get(dst))
                n = len(names)
                job.events.append(f"rebalanced: {n} site{'' if n == 1 else 's'} moved from worker {src} to "
                                  f"worker {dst}")
                log.info("job %s rebalanced: %d sites from worker %s to worker %s", job.job_id, n, src, dst)
            if moves:
                job.rebalanced_at = now
                self._save_progress(job)

    def _spread(self, job: JobRecord, pool: list[str], load: dict[str, int],
                holds: dict[str, dict[tuple[str, str], int]]) -> dict[tuple[str, str], list[str]]:
        """The moves that even out `job`'s sites over `pool` ({(from, to): sites}); `load` (every
        worker's sites, all jobs) is updated as they are chosen. Each move lowers the sum of squared
        loads, so this ends."""
        groups: dict[tuple[str, str], list[str]] = {}  # (owner, parent module) -> its sites of this job
        count = dict.fromkeys(load, 0)  # this job's sites per worker
        for name, rec in job.sites.items():
            if rec.owner in load:
                groups.setdefault((rec.owner, name.rpartition(".")[0] or name), []).append(name)
                count[rec.owner] += 1
        moves: dict[tuple[str, str], list[str]] = {}
        while groups and pool:
            best = None
            for dst in sorted(pool, key=lambda k: (load[k], k)):
                held = holds.get(dst, {})
                for (src, parent), names in groups.items():
                    g = len(names)
                    if src == dst or load[src] - load[dst] <= g or count[src] - count[dst] < g:
                        continue
                    mine = any((job.job_id, n) in held for n in names)
                    key = (not mine, -load[src], src, parent)
                    if best is None or key < best[0]:
                        best = (key, src, dst, parent)
                if best is not None:
                    break  # the emptiest worker that can take something takes it
            if best is None:
                return moves
            _, src, dst, parent = best
            names = groups.pop((src, parent))  # moved once: not again in this look
            moves.setdefault((src, dst), []).extend(names)
            load[src] -= len(names)
            load[dst] += len(names)
            count[src] -= len(names)
            count[dst] += len(names)
        return moves
