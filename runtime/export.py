"""Export adapters: a PEFT LoRA directory for lowrank, and colaflow's native format for every kind.

    save_peft(trainer.adapters("acme"), "out/acme-peft", model=model)   # task type from the model
    PeftModel.from_pretrained(base, "out/acme-peft")      # loads in stock PEFT
    save(trainer.adapters("acme"), spec, "out/acme")       # adapter.safetensors + adapter.json
    spec, adapters = load("out/acme")
    with attached(model, spec, adapters):                   # any kind (Houlsby, AdaLink, ...) for inference
        model.generate(...)
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .adapters import Adapter, LowRank, build_adapter, load_params, params_of
from .files import atomic_dir
from .job import JobSpec
from .sites import Site

FORMAT = "colaflow-adapter"
FORMAT_VERSION = 1


def _write_dir(path: str | os.PathLike, files: dict[str, object]) -> Path:
    """Write files into a sibling temp dir, then swap it in: a failure leaves the old export intact."""
    with atomic_dir(path) as tmp:
        for name, content in files.items():
            if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
    return Path(path)


def peft_task_type(model) -> str | None:
    """PEFT's `task_type` for a base model: CAUSAL_LM, SEQ_2_SEQ_LM, or None (a plain PeftModel).

    Heads (sequence or token classification) are not adapters: colaflow never trains them, so
    their export says None rather than SEQ_CLS/TOKEN_CLS, which would make PEFT expect the head in
    `modules_to_save`. Load such an adapter onto the same base checkpoint, head included.
    """
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and (
            name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    return None


def save_peft(adapters: dict[str, Adapter], path: str | os.PathLike, base_model: str | None = None,
              task_type: str | None = None, model=None) -> Path:
    """Write lowrank adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

    With `model` (the base), `task_type` and `base_model` default to what it is.
    """
    if model is not None:
        task_type = task_type or peft_task_type(model)
        base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if not adapters:
        raise ValueError("no adapters to export")
    specs = {a.spec for a in adapters.values()}
    if len(specs) != 1 or not isinstance(next(iter(specs)), LowRank):
        raise ValueError(f"PEFT export needs lowrank adapters of one spec, got {sorted(map(str, specs))}")
    spec: LowRank = next(iter(specs))
    if spec.attach != "parallel":
        raise ValueError("PEFT LoRA adds B A x to a module's output; a sequential lowrank adapter (h + B A h) "
                         "has no PEFT form: export it with `save` (colaflow's native format)")
    kinds = {a.site.kind for a in adapters.values()}
    tensors = {}
    for name, a in adapters.items():
        key = f"base_model.model.{name}"
        if a.site.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a.A, a.B
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.A, a.B
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": sorted(adapters), "fan_in_fan_out": kinds == {"conv1d"},
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return _write_dir(path, {"adapter_config.json": config, "adapter_model.safetensors": tensors})


def save(adapters: dict[str, Adapter], spec: JobSpec, path: str | os.PathLike,
         versions: dict[str, int] | None = None) -> Path:
    """Write any adapter kind in colaflow's native format (adapter.safetensors + adapter.json)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "job": spec.to_dict(),
            "sites": [a.site.to_dict() for a in adapters.values()], "versions": versions or {}}
    tensors = {f"{name}::{p}": v for name, a in adapters.items() for p, v in a.named_parameters()}
    return _write_dir(path, {"adapter.json": meta, "adapter.safetensors": tensors})


def load(path: str | os.PathLike) -> tuple[JobSpec, dict[str, Adapter]]:
    """Read a native export back: the job spec and {site: adapter}."""
    path = Path(path)
    meta_file = path / "adapter.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a colaflow adapter export (no adapter.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} v{meta.get('format_version')}")
    spec = JobSpec.from_dict(meta["job"])
    tensors = load_file(str(path / "adapter.safetensors"))
    adapters = {}
    for sd in meta["sites"]:
        site = Site.from_dict(sd)
        a = build_adapter(spec.adapter, site)
        load_params(a, {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == site.name})
        adapters[site.name] = a
    return spec, adapters


@contextlib.contextmanager
def attached(model: torch.nn.Module, spec: JobSpec, adapters: dict[str, Adapter]) -> Iterator[torch.nn.Module]:
    """Run `model` with `adapters` (as `load` returns them) on its sites, the way training did: parallel
    or sequential, token types included; e.g. `model.generate(...)` inside. Nothing stays behind."""
    from .host import Host  # the same site hooks as the server's forward: one way to apply an adapter

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    host = Host(model)
    try:
        sites = {s.name: s for s in host.add_job(spec)}
        for name, a in adapters.items():
            if sites.get(name) != a.site:
                raise ValueError(f"site `{name}` of the export does not fit this model: it resolves to "
                                 f"{sites.get(name)}, the export was made for {a.site}")
            load_params(host.jobs[spec.job_id].adapters[name], params_of(a))
        if set(sites) != set(adapters):
            raise ValueError(f"the export adapts {sorted(adapters)}, this model's sites for it are {sorted(sites)}")
        with host.using(spec.job_id):
            yield model
    finally:
        if spec.job_id in host.jobs:
            host.remove_job(spec.job_id)  # removes its hooks
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
