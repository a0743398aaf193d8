"""Placement: which worker owns which site, and what happens when workers come, go, stall or misbehave.

New sites go to the connected worker with the fewest, a parent module's sites together (`q_proj`
and `v_proj` read one input, which then travels once). A worker gone for `reassign_after`
seconds, silent that long, stalled past the fit timeout, or quarantined for an absurd update loses
its sites; they move, with the durable learner state, and the new owner replays the kept packets.
A worker that joins or comes back takes a share of running jobs' sites the same way (`_rebalance`:
a job's sites move for balance at most once per `rebalance_after` seconds). Each move is an event
of the job (its next metrics row: `colaflow logs`), and a lost worker shows as lost until it
returns or is forgotten (`FORGET_LOST_S`).
"""
from __future__ import annotations

import logging
import secrets
import threading

from ..errors import ResourceExhausted
from ..learn.messages import LearnerState
from .balance import Balance
from .lock import changes, locked
from .protocol import Assign, Hello, Revoke, SiteStart
from .records import LIVE, JobRecord, SiteRecord, WorkerRecord

log = logging.getLogger("colaflow.scheduler")
FIT_TIMEOUT_S = 300.0  # at least: no honest device takes this long to fit one step's packets
MIN_SILENCE_S = 10.0  # a live worker beats every second; a busy machine may delay a few: never less than this
FORGET_LOST_S = 3600.0  # a lost worker's record (shown as lost) goes after this long; its id is free again


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class Placement(Balance):
    # the scheduler's state (scheduler.py); only its methods write it
    jobs: dict[str, JobRecord]
    workers: dict[str, WorkerRecord]
    lock: threading.RLock

    @locked
    def register(self, worker_id: str, capabilities: dict | None = None, credential: str = "") -> str:
        """A worker announces itself; returns the session its connections must present.

        An id belongs to the first credential that registers it: another credential is refused, so
        a worker token cannot take over someone else's worker (and its adapters and packets).
        """
        w = self.workers.get(worker_id)
        if w is None:
            lost = sorted((x for x in self.workers.values() if x.lost_at is not None), key=lambda x: x.lost_at)
            if len(self.workers) >= self.max_workers and lost:
                del self.workers[lost[0].worker_id]  # the longest lost makes room
            if len(self.workers) >= self.max_workers:
                raise ResourceExhausted(f"the server has {len(self.workers)} workers registered (its limit)")
            w = self.workers[worker_id] = WorkerRecord(worker_id, secrets.token_hex(8), credential=credential,
                                                       registered_at=self.clock())
        if not w.credential:
            w.credential = credential  # a restored owner: the first to come back with a credential binds it
        elif not secrets.compare_digest(w.credential, credential):
            raise PermissionError(f"worker id {worker_id!r} belongs to another credential")
        w.capabilities = dict(capabilities or {})
        w.quarantined = self.quarantined.get(worker_id, w.quarantined)
        return w.session

    @changes
    def connect(self, worker_id: str, session: str, hello: Hello) -> int:
        """A connection opened: resume from the worker's progress; returns the connection's stream id."""
        w = self.workers.get(worker_id)
        if w is None or not secrets.compare_digest(w.session, session):
            raise PermissionError(f"worker {worker_id!r} must Register before Work (unknown session)")
        if w.connected:
            log.warning("worker %s connected again while its stream %d is live: the older stream closes "
                        "(two workers with one id?)", worker_id, w.stream)
        now, first, lost_at = self.clock(), w.stream == 0, w.lost_at
        w.stream += 1
        w.connected, w.left_at, w.credits, w.lost_at, w.left = True, None, 0, None, False
        w.connected_at = now
        w.control.clear()
        w.cursor.clear()
        holds = {(p.job, p.site): p.version for p in hello.progress}
        for p in hello.progress:
            job = self.jobs.get(p.job)
            rec = job.sites.get(p.site) if job is not None and job.state in LIVE else None
            if rec is not None and rec.owner is None and not w.quarantined:
                rec.owner = worker_id  # unowned (e.g. after a server restart): its holder takes it back
            if rec is not None and rec.owner == worker_id:
                w.cursor[(p.job, p.site)] = max(p.fitted_through, self._floor(job, rec))
        for job in self.jobs.values():
            mine = [n for n, r in job.sites.items() if r.owner == worker_id] if job.state in LIVE else []
            if mine:
                self._send_assign(w, job, mine, holds)
        if first or lost_at is not None:
            said = "joined" if lost_at is None else f"returned (lost {now - lost_at:.0f} s ago)"
            for job in self.jobs.values():
                if job.state in LIVE:
                    job.events.append(f"worker {worker_id} {said}")
        self._assign()
        self._balance_at = now  # a worker came: it may take a share of running jobs
        self._rebalance({worker_id: holds})  # sites it still holds go back to it first, kept as they are
        # what it holds and no longer owns, after the rebalance (a Revoke would drop a learner it keeps):
        # one Revoke per job; its resent updates of those sites are expected, not hostile
        stale: dict[str, list[str]] = {}
        for p in hello.progress:
            job = self.jobs.get(p.job)
            rec = job.sites.get(p.site) if job is not None and job.state in LIVE else None
            if rec is None or rec.owner != worker_id:
                if job is not None:
                    job.former.add(worker_id)
                stale.setdefault(p.job, []).append(p.site)
        for job_id, sites in stale.items():
            w.control.append(Revoke(job_id, sites, "no longer assigned to this worker"))
        log.info("worker %s connected (stream %d), owns %d sites", worker_id, w.stream, self._load(worker_id))
        return w.stream

    @changes
    def disconnect(self, worker_id: str, stream: int, leaving: bool = False) -> None:
        """The worker's connection ended; `leaving`: for good (its sites move at the next `ready`)."""
        w = self.workers.get(worker_id)
        if w is not None and w.stream == stream and w.connected:
            w.connected, w.left = False, leaving
            w.left_at = self.clock() - (self.reassign_after if leaving else 0.0)
            if leaving:
                log.info("worker %s left for good; its sites move now", worker_id)
            else:
                log.info("worker %s disconnected; its sites wait %.0f s before they move", worker_id,
                         self.reassign_after)

    @locked
    def heard(self, worker_id: str) -> None:
        """The transport heard from the worker now (any frame, a chunk of a long update, a heartbeat):
        it is alive, whatever it sends. In process nothing calls this: a local worker is never silent."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.last_seen = self.clock()

    @locked
    def worker_status(self, worker_id: str, stream: int, status: str) -> None:
        """A worker's own word on its health ("" = healthy), from its heartbeats."""
        w = self.workers.get(worker_id)
        if w is None or w.stream != stream or w.status == status:
            return
        w.status = status
        if status:
            log.warning("worker %s is unhealthy: %s", worker_id, status)
        else:
            log.info("worker %s is healthy again", worker_id)

    @locked
    def current(self, worker_id: str, stream: int) -> bool:
        """True while `stream` is the worker's live connection."""
        w = self.workers.get(worker_id)
        return w is not None and w.connected and w.stream == stream

    def _load(self, worker_id: str) -> int:
        return sum(r.owner == worker_id for j in self.jobs.values() for r in j.sites.values())

    def _assign(self) -> None:
        """Give every unowned site of a live job to the connected worker with the fewest sites; sites
        of one parent module (q_proj and v_proj of one attention) go together, since they usually
        read one input and a shared input travels once per worker."""
        live = sorted(w.worker_id for w in self.workers.values() if w.connected and not w.quarantined)
        if not live:
            return
        load = {wid: self._load(wid) for wid in live}
        for job in self.jobs.values():
            if job.state not in LIVE:
                continue
            new: dict[str, list[str]] = {}
            groups: dict[str, list[str]] = {}
            for name, rec in job.sites.items():
                if rec.owner is None:
                    groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
            pool = [k for k in live if k not in job.slow] or live  # one that held it up: last resort
            for names in groups.values():
                wid = min(pool, key=lambda k: (load[k], k))
                for name in names:
                    job.sites[name].owner = wid
                load[wid] += len(names)
                new.setdefault(wid, []).extend(names)
            for wid, names in new.items():
                self._send_assign(self.workers[wid], job, names)
                log.info("assigned job %s sites %d -> worker %s", job.job_id, len(names), wid)
                if job.former or job.t:  # not the job's first placement: they moved
                    job.events.append(f"{_plural(len(names), 'site')} moved to worker {wid}")
            if new:
                self._save_progress(job)

    def _send_assign(self, w: WorkerRecord, job: JobRecord, names: list[str], holds: dict | None = None) -> None:
        starts = []
        for name in names:
            rec = job.sites[name]
            held = (holds or {}).get((job.job_id, name), -1)
            # a worker that holds this version or a newer one keeps its own: no need to resend the state
            start = None if held >= job.durable(rec) else self._start(job, rec)
            starts.append(SiteStart(rec.site, start))
            key = (job.job_id, name)
            w.cursor[key] = max(w.cursor.get(key, -1), self._floor(job, rec))
        w.control.append(Assign(job.job_id, job.spec, starts))

    def _start(self, job: JobRecord, rec: SiteRecord) -> LearnerState | None:
        """Where a new owner of the site starts: the durable learner state (None: fresh)."""
        initial = None if job.init is None else LearnerState(0, job.init[rec.site.name], None)
        if job.spec.state_every:
            return rec.state if rec.state is not None else initial
        if rec.received == 0:
            return initial
        log.warning("job %s site %s moves with parameters only (state_every=0): a fresh optimizer",
                    job.job_id, rec.site.name)
        return LearnerState(rec.received, rec.versions[rec.received], None)

    def _take(self, job: JobRecord, worker_id: str, names: list[str], reason: str) -> None:
        """Revoke `names` of `job` from their owner `worker_id` (they are unowned after this): its late
        updates of them are expected, and if they come back to it, it gets their packets anew."""
        for name in names:
            job.sites[name].owner = None
        job.former.add(worker_id)
        w = self.workers.get(worker_id)
        if w is not None:
            for name in names:
                w.cursor.pop((job.job_id, name), None)
            w.control.append(Revoke(job.job_id, names, reason))

    def _quarantine(self, worker_id: str, reason: str) -> None:
        """Take every site from a worker that sent an absurd update; they continue elsewhere from the
        last durable learner state, so the jobs resume exactly where the last good version left them."""
        w = self.workers[worker_id]
        w.quarantined = reason
        if len(self.quarantined) < self.max_workers:
            self.quarantined[worker_id] = reason  # it stays quarantined if it registers again
        log.warning("worker %s quarantined: %s", worker_id, reason)
        for job in self.jobs.values():
            mine = [n for n, r in job.sites.items() if r.owner == worker_id]
            if mine:
                job.events.append(f"worker {worker_id} quarantined ({reason}); its {_plural(len(mine), 'site')} move")
                self._take(job, worker_id, mine, f"quarantined: {reason}")
        self._assign()

    def _reassign_lost(self) -> None:
        """Placement's duties at every `ready`: sites of a worker gone longer than `reassign_after` move to
        connected workers (it shows as lost, until it returns or `FORGET_LOST_S` passes); sites spread
        onto workers that joined (`_rebalance`). A worker whose stream is open but silent that long (no
        frame, no heartbeat: stopped, hung, or cut off without a reset) counts as gone since it was last
        heard from; if it wakes, it reconnects as any other."""
        now = self.clock()
        silent_after = max(self.reassign_after, MIN_SILENCE_S)
        for w in self.workers.values():
            if w.connected and w.last_seen is not None and now - w.last_seen >= silent_after:
                log.warning("worker %s silent for %.0f s (no frame or heartbeat): it counts as gone", w.worker_id,
                            now - w.last_seen)
                w.connected, w.left_at = False, w.last_seen
        for w in [w for w in self.workers.values() if not w.connected and not self._load(w.worker_id) and (
                (w.left_at is None and now - w.registered_at > max(60.0, self.reassign_after))  # never connected
                or (w.lost_at is not None and now - w.lost_at >= FORGET_LOST_S))]:
            del self.workers[w.worker_id]  # forgotten: its id is free again
        gone = [w for w in self.workers.values() if not w.connected and w.left_at is not None
                and w.lost_at is None and now - w.left_at >= self.reassign_after]
        if gone and any(w.connected for w in self.workers.values()):  # else they wait (and it may come back)
            for w in gone:
                moved = 0
                how = "left" if w.left else f"lost (no word for {now - w.left_at:.0f} s)"
                for job in self.jobs.values():
                    mine = [n for n, r in job.sites.items() if r.owner == w.worker_id]
                    if mine:
                        self._take(job, w.worker_id, mine, "lost")
                        job.events.append(f"worker {w.worker_id} {how}: its {_plural(len(mine), 'site')} move")
                        moved += len(mine)
                w.lost_at = now
                w.control.clear()  # nothing queued for it goes anywhere: it connects anew if it returns
                log.warning("worker %s %s: moving its %d sites", w.worker_id, how, moved)
            self._assign()
        self._rebalance()

    def _move_stalled(self) -> None:
        """Sites whose worker is connected (it beats) but has sent no version the job waits for in
        `fit_timeout` seconds (a hung fit, a worker that takes packets and never fits or never grants
        credit) move to another worker, from the last durable state: exact, only time is lost."""
        now, moved = self.clock(), False
        for job in self.jobs.values():
            if job.state != "running":
                job.stall = None
                continue
            target = job.need(job.t) if job.steps is None or job.t < job.steps else job.final_version()
            lagging = [n for n, r in job.sites.items() if r.received < target and r.owner in self.workers
                       and self.workers[r.owner].connected]  # a disconnected owner is `_reassign_lost`'s
            mark = (job.t, sum(r.received for r in job.sites.values()))
            if not lagging or job.stall is None or job.stall[0] != mark:
                job.stall = (mark, now)  # moving: the clock starts again
                continue
            if now - job.stall[1] < self.fit_timeout:
                continue
            by_owner: dict[str, list[str]] = {}
            for name in lagging:
                by_owner.setdefault(job.sites[name].owner, []).append(name)
            for wid, names in by_owner.items():
                why = f"worker {wid} sent no fit of {_plural(len(names), 'site')} in {now - job.stall[1]:.0f} s"
                log.warning("job %s: %s; they move", job.job_id, why)
                job.events.append(f"{why}; they move")
                job.slow.add(wid)
                self._take(job, wid, names, why)
            job.stall, moved = (mark, now), True
        if moved:
            self._assign()

    def _revoke(self, job: JobRecord, reason: str) -> None:
        by_owner: dict[str, list[str]] = {}
        for name, rec in job.sites.items():
            if rec.owner is not None:
                by_owner.setdefault(rec.owner, []).append(name)
        for wid, names in by_owner.items():
            self._take(job, wid, names, reason)
