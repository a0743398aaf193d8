"""The worker: the transport-free state machine of a device that owns adapters. Plain objects.

The edge daemon, a Ray actor and the in-process `Trainer` are pumps around this one class: they
move its messages (colaflow.control.protocol) and call `retry` on a timer, nothing else.

    w = Worker("laptop-1", Checkpoints("~/.colaflow-edge"))
    w.hello()              # on every connect: how far each site got
    w.resend()             # then every update the server has not acknowledged, oldest first
    w.handle(msg)          # Assign | Packets | Ack | Revoke -> [Update | Refusal] to send
    w.retry()              # a checkpoint that failed (full disk) is retried with back-off

A fit's updates leave only once they are durable here (checkpoint before emit); the learner's
full state also rides with every `state_every`-th update, so the server can hand the site to
another worker exactly if this one is lost for good.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..checks import backoff
from ..job import JobSpec
from ..learn.learner import Learner, state_from_flat, state_to_flat, update_from_flat, update_to_flat
from ..learn.messages import Update
from ..sites import Site
from .checkpoints import Checkpoints
from .protocol import Ack, Assign, Hello, Packets, Progress, Refusal, Revoke, ToServer, ToWorker

log = logging.getLogger("colaflow.worker")
Key = tuple[str, str]  # (job, site)


class Worker:
    def __init__(self, worker_id: str, store: Checkpoints | None = None, device: str = "cpu",
                 clock: Callable[[], float] = time.monotonic, max_backoff: float = 30.0):
        self.worker_id, self.store, self.device = worker_id, store, device
        self.clock, self.max_backoff = clock, max_backoff
        self.learners: dict[Key, Learner] = {}
        self.unacked: dict[Key, list[Update]] = {}  # fitted, not yet acknowledged (held ones included)
        self.held: dict[str, list[Update]] = {}  # per job: fitted but not yet durable, so not yet sent
        self.failure = ""  # why the last checkpoint failed; "" when healthy
        self.retry_at = 0.0
        self._failures = 0
        self.fits = 0
        if store is not None:
            self._restore()

    @property
    def healthy(self) -> bool:
        return not self.held

    def hello(self) -> Hello:
        return Hello([Progress(j, s, learner.version, learner.fitted_through) for (j, s),
                      learner in sorted(self.learners.items())])

    def resend(self) -> list[Update]:
        """Every update the server may lack, oldest first (after each connect)."""
        held = {id(u) for us in self.held.values() for u in us}
        return [u for key in sorted(self.unacked) for u in self.unacked[key] if id(u) not in held]

    def handle(self, msg: ToWorker) -> list[ToServer]:
        return self.handle_all([msg])

    def handle_all(self, msgs: list[ToWorker]) -> list[ToServer]:
        """Handle messages in order; the fits of consecutive packet frames are checkpointed once per
        job (a step streams out as many frames as it has input groups; a disk write each would cost)."""
        out: list[ToServer] = []
        fitted: dict[str, list[Update]] = {}
        for msg in msgs:
            if isinstance(msg, Packets):
                out += self._packets(msg, fitted.setdefault(msg.job, []))
                continue
            out += self._release(fitted)  # before an Ack, Assign or Revoke changes what is held
            out += self._other(msg)
        return out + self._release(fitted)

    def _release(self, fitted: dict[str, list[Update]]) -> list[ToServer]:
        out: list[ToServer] = []
        for job, new in fitted.items():
            if new:  # held ones from an earlier failure go with them, in order
                out += self._emit(job, new)
        fitted.clear()
        return out

    def _other(self, msg: ToWorker) -> list[ToServer]:
        if isinstance(msg, Assign):
            return self._assign(msg)
        if isinstance(msg, Ack):
            key = (msg.job, msg.site)
            if key in self.unacked:
                self.unacked[key] = [u for u in self.unacked[key] if u.version > msg.version]
            return []
        if isinstance(msg, Revoke):
            self._revoke(msg)
            return []
        raise TypeError(f"a worker takes Assign, Packets, Ack or Revoke, not {type(msg).__name__}")

    def retry(self) -> list[Update]:
        """Try the failed checkpoints again once their back-off has passed; the updates they release."""
        if not self.held or self.clock() < self.retry_at:
            return []
        out: list[Update] = []
        for job in list(self.held):
            out += self._emit(job, [])
        return out

    # messages

    def _assign(self, a: Assign) -> list[ToServer]:
        out: list[ToServer] = []
        fresh: list[str] = []  # sites that start from parameters alone (an `init` export, a state_every=0 move)
        for start in a.sites:
            key = (a.job, start.site.name)
            have = self.learners.get(key)
            version = start.state.version if start.state is not None else 0
            if have is not None and have.version >= version:
                continue  # ours is as new or newer: keep it (and its unacknowledged updates)
            try:
                learner = Learner(a.spec, start.site, self.device)
            except Exception as e:  # a spec this worker cannot build fails its job, not the worker (or its stream)
                out.append(Refusal(a.job, start.site.name, version,
                                   f"cannot build its learner: {type(e).__name__}: {e}"))
                continue
            if start.state is not None:
                try:
                    learner.restore(start.state)
                except Exception as e:  # a state this worker cannot load fails its job, not the worker
                    out.append(Refusal(a.job, start.site.name, version, f"{type(e).__name__}: {e}"))
                    continue
                if start.state.optimizer is None:
                    fresh.append(start.site.name)
            self.learners[key] = learner
            self.unacked[key] = []
            if a.job in self.held:
                self.held[a.job] = [u for u in self.held[a.job] if (u.job, u.site) != key]
        if fresh:  # one line, not one per site: `init=` (an export) starts every site so, as documented
            log.info("job %s: %d site%s continue from their given weights with a fresh optimizer (%s%s)", a.job,
                     len(fresh), "s" if len(fresh) > 1 else "", ", ".join(fresh[:2]), ", ..." if len(fresh) > 2 else "")
        log.info("assigned job %s: %d sites", a.job, len(a.sites))
        return out

    def _packets(self, frame: Packets, new: list[Update]) -> list[ToServer]:
        """Fit what the frame completes; its updates go to `new` (released once checkpointed)."""
        out: list[ToServer] = []
        for p in frame.packets:
            learner = self.learners.get((p.job, p.site))
            if learner is None or p.step <= learner.fitted_through + len(learner.buffer):
                continue  # not ours (revoked), or a replay of a step we already hold
            try:
                update = learner.consume(p)
            except Exception as e:  # a bad packet (or state) fails its job on the server, never this worker
                reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                out.append(Refusal(p.job, p.site, p.step, reason))
                continue
            if update is not None:
                self.fits += 1
                self.unacked.setdefault((p.job, p.site), []).append(update)
                new.append(update)
        return out

    def _emit(self, job: str, new: list[Update]) -> list[Update]:
        """Checkpoint `job`, then release its held updates; on failure hold them and back off."""
        held = self.held.setdefault(job, [])
        held += new
        if self.store is not None:
            try:
                self.store.save(job, self._checkpoint(job, {u.site for u in held}))
            except OSError as e:
                self._failures += 1
                delay = backoff(self._failures, self.max_backoff)
                self.retry_at = self.clock() + delay
                self.failure = f"checkpoint of job {job} failed: {e}"
                log.error("%s; holding %d updates, retrying in %.1f s", self.failure, len(held), delay)
                return []
        released = self.held.pop(job)
        if not self.held:
            self.failure, self._failures = "", 0
        return released

    def _revoke(self, r: Revoke) -> None:
        for site in r.sites:
            key = (r.job, site)
            self.learners.pop(key, None)
            self.unacked.pop(key, None)
        if r.job in self.held:
            self.held[r.job] = [u for u in self.held[r.job] if u.site not in r.sites]
            if not self.held[r.job]:
                del self.held[r.job]
        log.info("job %s: %d sites revoked (%s)", r.job, len(r.sites), r.reason)
        if self.store is None:
            return
        try:
            if any(j == r.job for j, _ in self.learners):
                self.store.remove(r.job, list(r.sites))
            else:
                self.store.remove(r.job)
        except OSError as e:  # a stale checkpoint is harmless: the server revokes it again on connect
            log.warning("could not update the checkpoint of job %s after a revocation: %s", r.job, e)

    # checkpoints: the learner state's plain form (colaflow.learn.learner), read back with weights_only=True

    def _checkpoint(self, job: str, sites: set[str]) -> dict:
        """The entries of `sites` of `job` (those whose learners moved since their last checkpoint)."""
        return {site: {"spec": learner.spec.to_dict(), "site": learner.site.to_dict(),
                       "state": _pair(state_to_flat(learner.state())),
                       "unacked": [_pair(update_to_flat(u)) for u in self.unacked.get((j, site), [])]}
                for (j, site), learner in self.learners.items() if j == job and site in sites}

    def _restore(self) -> None:
        for job, sites in self.store.load().items():
            for name, entry in sites.items():
                try:
                    spec, site = JobSpec.from_dict(entry["spec"]), Site.from_dict(entry["site"])
                    learner = Learner(spec, site, self.device)
                    learner.restore(state_from_flat(**entry["state"]))
                    unacked = [update_from_flat(**u) for u in entry["unacked"]]
                except Exception as e:  # a checkpoint of another version of colaflow, say: as for a corrupt file,
                    # the server's copy of the learner state takes over (exact failover)
                    log.error("checkpoint of job %s site %s cannot be read back (%s: %s); the server's learner "
                              "state takes over", job, name, type(e).__name__, e)
                    continue
                self.learners[(job, name)] = learner
                self.unacked[(job, name)] = unacked
        if self.learners:
            log.info("restored %d learners from %s", len(self.learners), self.store)


def _pair(flat: tuple[dict, dict]) -> dict:
    tensors, meta = flat
    return {"tensors": tensors, "meta": meta}
