"""Delivery: packet frames out under the worker's credit, updates in, acknowledgements back.

A worker's control messages (Assign, Ack, Revoke) go before any packets; packets go oldest step
first, one frame per (job, step), each only once per connection. An update is taken only from the
site's owner, only as the next version, only if it passes `acceptance`, and acknowledged once stored.
"""
from __future__ import annotations

import logging
import math
import threading

from ..learn.messages import LearnerState, Update
from .acceptance import check_update, out_of_bounds
from .lock import changes, locked
from .protocol import Ack, Packets, Refusal, Revoke, ToServer, ToWorker
from .records import LIVE, JobRecord, SiteRecord, WorkerRecord

log = logging.getLogger("colaflow.scheduler")


class Delivery:
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock

    @changes
    def grant(self, worker_id: str, stream: int, n: int) -> None:
        """The worker may take `n` more packet frames."""
        if self.current(worker_id, stream):
            self.workers[worker_id].credits += max(0, int(n))

    @locked
    def next_message(self, worker_id: str, stream: int) -> ToWorker | None:
        """The next message for the worker's live connection, or None (nothing now, or no credit)."""
        if not self.current(worker_id, stream):
            return None
        w = self.workers[worker_id]
        if w.control:
            return w.control.popleft()
        if w.credits <= 0:
            return None
        frame = self._next_frame(w)
        if frame is not None:
            w.credits -= 1
        return frame

    def _next_frame(self, w: WorkerRecord) -> Packets | None:
        """The oldest step any of the worker's sites still lacks on this connection, as one frame."""
        best: tuple[int, str] | None = None
        for job_id, job in self.jobs.items():
            if job.state not in LIVE:
                continue
            for name, rec in job.sites.items():
                if rec.owner != w.worker_id or not rec.retained:
                    continue
                first = next(iter(rec.retained))
                nxt = max(w.cursor.get((job_id, name), first - 1) + 1, first)
                if nxt < first + len(rec.retained) and (best is None or nxt < best[0]):
                    best = (nxt, job_id)
        if best is None:
            return None
        step, job_id = best
        packets = []
        for name, rec in self.jobs[job_id].sites.items():
            key = (job_id, name)
            if rec.owner == w.worker_id and step in rec.retained and w.cursor.get(key, -1) < step:
                packets.append(rec.retained[step])
                w.cursor[key] = step
        return Packets(job_id, step, packets)

    @locked
    def max_update_bytes(self) -> int:
        """The largest update frame an honest worker can send now: per-connection memory stays bounded."""
        if self._max_update is None:
            biggest = max((4 * sum(math.prod(s) for s in r.shapes.values())  # fp32 params
                           for j in self.jobs.values() if j.state in LIVE for r in j.sites.values()), default=0)
            self._max_update = 4 * biggest + (1 << 20)  # params, two optimizer moments, and room to spare
        return self._max_update

    @locked
    def count_bytes(self, job_id: str, worker_id: str = "", sent: int = 0, received: int = 0) -> None:
        """Wire bytes of a job's packets to `worker_id` and of its updates from it, as the transport counts them."""
        job, w = self.jobs.get(job_id), self.workers.get(worker_id)
        if job is not None:
            job.bytes_sent += sent
            job.bytes_received += received
        if w is not None:
            w.bytes_out += sent
            w.bytes_in += received

    @changes
    def receive(self, worker_id: str, msg: ToServer) -> None:
        """Take an Update or Refusal from a worker. Raises PermissionError / ValueError on bad input."""
        if isinstance(msg, Refusal):
            job = self.jobs.get(msg.job)
            rec = job.sites.get(msg.site) if job is not None else None
            if rec is not None and rec.owner == worker_id and job.state in LIVE:
                self.fail(msg.job, f"worker {worker_id} refused step {msg.step} of site `{msg.site}`: {msg.reason}")
            elif job is None or worker_id not in job.former:  # as for updates: only its own sites' business
                raise PermissionError(f"worker {worker_id!r} is not assigned site `{msg.site}` of job {msg.job!r}")
            return
        if not isinstance(msg, Update):
            raise TypeError(f"a worker sends Update or Refusal, not {type(msg).__name__}")
        self._on_update(worker_id, msg)

    def _on_update(self, worker_id: str, u: Update) -> None:
        job = self.jobs.get(u.job)
        rec = job.sites.get(u.site) if job is not None else None
        w = self.workers.get(worker_id)
        if rec is None or rec.owner != worker_id or w is None:
            if job is not None and w is not None and worker_id in job.former:
                w.control.append(Revoke(u.job, [u.site], "no longer assigned to this worker"))
                return  # late, from a past owner: normal after a move or a cancel
            # unknown and foreign jobs read the same: a worker learns nothing of other tenants
            raise PermissionError(f"worker {worker_id!r} is not assigned site `{u.site}` of job {u.job!r}")
        if u.version <= rec.received:  # a replay: acknowledge again, change nothing
            w.control.append(Ack(u.job, u.site, rec.received))
            return
        if u.version != rec.received + 1:
            raise ValueError(f"update of `{u.site}` has version {u.version}; expected {rec.received + 1}")
        want = u.version * job.spec.fit_interval - 1
        if u.fitted_through != want:
            raise ValueError(f"update of `{u.site}` v{u.version} says it fitted through step "
                             f"{u.fitted_through}; expected {want}")
        try:
            check_update(job.spec, rec, u)
        except ValueError as e:  # the job's own update cannot be used: it fails, with why; the stream and
            # the worker's other jobs go on, and the Revoke stops the worker sending it again on reconnect
            self.fail(u.job, f"worker {worker_id} sent an update it cannot have fitted: {e}")
            return
        why = out_of_bounds(rec, u)
        if why:  # finite but absurd: refuse it, and give this worker no more work
            self._quarantine(worker_id, f"update v{u.version} of `{u.site}` of job {u.job} is out of bounds: {why}")
            return
        prev = rec.received, rec.state
        rec.versions[u.version] = u.params
        rec.received = u.version
        if u.optimizer is not None:
            rec.state = LearnerState(u.version, u.params, u.optimizer)
        try:
            self.store.save_site(u.job, u.site, rec)
        except BaseException as e:
            rec.versions.pop(u.version, None)
            rec.received, rec.state = prev
            if isinstance(e, OSError):
                self._store_failed(e)  # the worker resends it; health says why meanwhile
            raise
        self._prune(job)
        if u.lr > 0:  # the fit's metrics, for the map of the step that uses this version
            job.fit_stats.setdefault(u.version, {})[u.site] = (float(u.grad_norm), float(u.lr))
        job.fits += 1
        w.fits += 1
        w.fit_times.append(self.clock())
        w.control.append(Ack(u.job, u.site, u.version))

    def _prune(self, job: JobRecord) -> None:
        """Drop packets that durable state covers and versions no restart or step can need."""
        keep = job.need(job.restart_step())
        for rec in job.sites.values():
            first = self._floor(job, rec) + 1
            for step in list(rec.retained):
                if step >= first:
                    break
                del rec.retained[step]
            for v in [v for v in rec.versions if v < keep and v != rec.received]:
                del rec.versions[v]

    def _floor(self, job: JobRecord, rec: SiteRecord) -> int:
        """The last step that the site's durable state already folds in."""
        return job.durable(rec) * job.spec.fit_interval - 1
