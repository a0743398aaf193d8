"""The server's state directory: the scheduler's `Store`, as files.

    DIR/<job>/job.msgpack                spec, sites, steps, tenant, init (written once, at submit)
    DIR/<job>/data.msgpack               its data map (written at submit; deleted when the job ends)
    DIR/<job>/progress.json              next step, state, error, owners (after every step)
    DIR/<job>/metrics.jsonl              one metric row per step, appended with the progress
    DIR/<job>/sites/<site>/v<N>.safetensors   the parameters of each version a restart can need
    DIR/<job>/sites/<site>/state.safetensors  the newest learner state (parameters, optimizer moments,
                                              schedule) in its one plain form (colaflow.learn.learner)
                                              both written before the update is acknowledged

A restarted server resumes each live job at its restart step — the first step no durable
learner state covers — with exactly the adapter versions those steps used; workers resend what
was not acknowledged and skip what they already hold. Every file is replaced atomically. A deleted
job's directory is first renamed aside (`.deleted-*`, never loaded), then removed.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from safetensors.torch import load_file, save

from colaflow.control.records import SiteRecord
from colaflow.control.store import Store
from colaflow.files import atomic_write
from colaflow.learn.learner import state_from_flat, state_to_flat
from colaflow.learn.messages import LearnerState, OptimizerState
from colaflow.maps import pack, unpack


class DirStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._state_versions: dict[tuple[str, str], int] = {}  # the learner state on disk, per site

    def __repr__(self) -> str:
        return str(self.root)

    def save_job(self, job_id: str, record: dict) -> None:
        record = dict(record)
        data = record.pop("data", None)
        if data is not None:  # apart: it goes when the job ends
            atomic_write(self.root / job_id / "data.msgpack", pack(data))
        atomic_write(self.root / job_id / "job.msgpack", pack(record))

    def drop_data(self, job_id: str) -> None:
        (self.root / job_id / "data.msgpack").unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        d = self.root / job_id
        for key in [k for k in self._state_versions if k[0] == job_id]:
            del self._state_versions[key]
        if not d.is_dir():
            return
        aside = self.root / f".deleted-{job_id}-{secrets.token_hex(4)}"
        try:
            d.rename(aside)  # at once: a crash mid-removal leaves nothing a restart would load
        except OSError:
            aside = d
        shutil.rmtree(aside, ignore_errors=True)

    def job_bytes(self, job_id: str) -> int:
        total = 0
        for parent, _, files in os.walk(self.root / job_id):
            for name in files:
                try:
                    total += os.stat(os.path.join(parent, name)).st_size
                except OSError:
                    pass
        return total

    def trouble(self) -> str:
        try:
            st = os.statvfs(self.root)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        free = st.f_bavail * st.f_frsize
        return f"{self.root} has {free >> 10} KiB free" if free < MIN_FREE_BYTES else ""

    def save_progress(self, job_id: str, progress: dict) -> None:
        atomic_write(self.root / job_id / "progress.json", json.dumps(progress).encode())

    def save_metrics(self, job_id: str, rows: list[dict], replace: bool = False) -> None:
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        if replace:
            atomic_write(self.root / job_id / "metrics.jsonl", lines)
        else:  # a crash (or a full disk) mid-append leaves a torn last line, which `load` skips
            with open(self.root / job_id / "metrics.jsonl", "ab+") as f:
                if f.tell():
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":  # that torn line ends here, so the rows after it stay whole
                        lines = b"\n" + lines
                f.write(lines)

    def save_site(self, job_id: str, site: str, rec: SiteRecord) -> None:
        """Write what is new (a version's parameters once, the learner state when it changes), then
        drop the versions the scheduler no longer keeps: each fit writes its update, not the history."""
        d = self.root / job_id / "sites" / site
        on_disk = {int(p.name[1:-len(".safetensors")]) for p in d.glob("v*.safetensors")}
        for v, params in rec.versions.items():
            if v not in on_disk:
                atomic_write(d / f"v{v}.safetensors", save(_cpu(params)))
        if rec.state is not None and self._state_versions.get((job_id, site)) != rec.state.version:
            tensors, meta = state_to_flat(rec.state)
            atomic_write(d / "state.safetensors", save(_cpu(tensors), metadata={"state": json.dumps(meta)}))
            self._state_versions[(job_id, site)] = rec.state.version
        for v in on_disk - set(rec.versions):
            (d / f"v{v}.safetensors").unlink(missing_ok=True)

    def load(self) -> list[dict]:
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if d.name.startswith(".deleted-"):  # a deletion a crash cut short: finish it (frees space)
                shutil.rmtree(d, ignore_errors=True)
            if d.name.startswith(".") or not (d / "job.msgpack").exists():
                continue
            progress = d / "progress.json"
            job = unpack((d / "job.msgpack").read_bytes(), f"{d}/job.msgpack")
            if (d / "data.msgpack").exists():
                job["data"] = unpack((d / "data.msgpack").read_bytes(), f"{d}/data.msgpack")
            out.append({"job": job,
                        "progress": json.loads(progress.read_text()) if progress.exists() else None,
                        "sites": {f.name: _load_site(f) for f in sorted(d.glob("sites/*")) if f.is_dir()},
                        "metrics": _load_metrics(d / "metrics.jsonl")})
        return out


MIN_FREE_BYTES = 1 << 20  # below this the state dir counts as full: health says so before a write fails


def _load_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # torn by a crash mid-append; its step is recomputed
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def _cpu(tensors: dict) -> dict:
    return {k: t.detach().contiguous().cpu() for k, t in tensors.items()}


def _load_site(d: Path) -> dict:
    from safetensors import safe_open

    versions = {int(p.name[1:-len(".safetensors")]): load_file(str(p)) for p in d.glob("v*.safetensors")}
    state = None
    if (d / "state.safetensors").exists():
        with safe_open(str(d / "state.safetensors"), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(d / "state.safetensors"))
        if "state" in meta:
            state = state_from_flat(tensors, json.loads(meta["state"]))
        else:  # a state dir of colaflow 0.1.0 before this form: optimizer tensors only, params in v<N>
            v = int(meta["version"])
            optimizer = OptimizerState(tensors, json.loads(meta["optimizer"])) if meta["optimizer"] else None
            state = LearnerState(v, versions[v], optimizer)
    return {"received": max(versions, default=0), "versions": versions, "state": state}
