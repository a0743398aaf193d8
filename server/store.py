"""The server's state directory: every job's spec and data, and a snapshot before each step.

    DIR/<job>/job.msgpack           spec, data map, steps (written once, at submit)
    DIR/<job>/progress.safetensors  the adapters' parameters + {step, state, versions} metadata

A snapshot is taken before each step runs, when (with S = 0) every site of the job is exactly at
version floor(step / I): a restarted server recomputes from there, and the workers' checkpoints
and replay make the run finish exactly as the failure-free one. Files are replaced atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from colaflow import serde


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save_job(self, job_id: str, spec: dict, data: dict, steps: int) -> None:
        d = self.root / job_id
        d.mkdir(exist_ok=True)
        blob = serde.pack({"spec": spec, "data": data, "steps": steps})
        _atomic(d / "job.msgpack", lambda tmp: Path(tmp).write_bytes(blob))

    def save_progress(self, job_id: str, step: int, state: str, versions: dict[str, int],
                      params: dict[str, dict[str, torch.Tensor]], owners: dict[str, str]) -> None:
        tensors = {f"{site}::{name}": t.detach().contiguous() for site, p in params.items() for name, t in p.items()}
        meta = {"step": str(step), "state": state, "versions": json.dumps(versions), "owners": json.dumps(owners)}
        _atomic(self.root / job_id / "progress.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load(self) -> list[dict]:
        """Every stored job: {spec, data, steps, progress: {step, state, versions, params} | None}."""
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not (d / "job.msgpack").exists():
                continue
            job = serde.unpack((d / "job.msgpack").read_bytes(), f"{d}/job.msgpack")
            job["progress"] = None
            prog = d / "progress.safetensors"
            if prog.exists():
                from safetensors import safe_open

                with safe_open(str(prog), "pt") as f:
                    meta = f.metadata()
                params: dict[str, dict[str, torch.Tensor]] = {}
                for key, t in load_file(str(prog)).items():
                    site, name = key.split("::", 1)
                    params.setdefault(site, {})[name] = t
                job["progress"] = {"step": int(meta["step"]), "state": meta["state"],
                                   "versions": json.loads(meta["versions"]), "owners": json.loads(meta["owners"]),
                                   "params": params}
            out.append(job)
        return out
