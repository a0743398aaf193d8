"""The server's state directory: the scheduler's `Store`, as files.

    DIR/<job>/job.msgpack                spec, sites, steps, data map (written once, at submit)
    DIR/<job>/progress.json              next step, state, error, owners (after every step)
    DIR/<job>/sites/<site>.safetensors   the versions a restart can need, and the newest learner
                                         state (optimizer moments): written before an update is acked

A restarted server resumes each live job at its restart step — the first step no durable
learner state covers — with exactly the adapter versions those steps used; workers resend what
was not acknowledged and skip what they already hold. Every file is replaced atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save

from colaflow import serde
from colaflow.files import atomic_write
from colaflow.gl import LearnerState, OptimizerState
from colaflow.scheduler import SiteRecord, Store


class DirStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return str(self.root)

    def save_job(self, job_id: str, record: dict) -> None:
        atomic_write(self.root / job_id / "job.msgpack", serde.pack(record))

    def save_progress(self, job_id: str, progress: dict) -> None:
        atomic_write(self.root / job_id / "progress.json", json.dumps(progress).encode())

    def save_site(self, job_id: str, site: str, rec: SiteRecord) -> None:
        tensors = {f"v{v}::{name}": t.detach().contiguous().cpu() for v, p in rec.versions.items() for name, t in p.items()}
        meta = {"received": str(rec.received), "state_version": "", "optimizer": ""}
        if rec.state is not None:
            meta["state_version"] = str(rec.state.version)
            if rec.state.optimizer is not None:
                tensors |= {f"opt::{k}": t.detach().contiguous().cpu() for k, t in rec.state.optimizer.tensors.items()}
                meta["optimizer"] = json.dumps(rec.state.optimizer.meta)
        atomic_write(self.root / job_id / "sites" / f"{site}.safetensors", save(tensors, metadata=meta))

    def load(self) -> list[dict]:
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not (d / "job.msgpack").exists():
                continue
            progress = d / "progress.json"
            out.append({"job": serde.unpack((d / "job.msgpack").read_bytes(), f"{d}/job.msgpack"),
                        "progress": json.loads(progress.read_text()) if progress.exists() else None,
                        "sites": {f.name[:-len(".safetensors")]: _load_site(f) for f in sorted(d.glob("sites/*.safetensors"))}})
        return out


def _load_site(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    versions: dict[int, dict] = {}
    opt: dict = {}
    for key, t in load_file(str(path)).items():
        kind, _, name = key.partition("::")
        if kind == "opt":
            opt[name] = t
        else:
            versions.setdefault(int(kind[1:]), {})[name] = t
    state = None
    if meta["state_version"]:
        v = int(meta["state_version"])
        optimizer = OptimizerState(opt, json.loads(meta["optimizer"])) if meta["optimizer"] else None
        state = LearnerState(v, versions[v], optimizer)
    return {"received": int(meta["received"]), "versions": versions, "state": state}
