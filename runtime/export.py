"""Export adapters: a PEFT LoRA directory for lowrank, and colaflow's native format for every kind.

    save_peft(trainer.adapters("acme"), "out/acme-peft", model=model)   # task type from the model
    PeftModel.from_pretrained(base, "out/acme-peft")      # loads in stock PEFT
    save(trainer.adapters("acme"), spec, "out/acme")       # adapter.safetensors + adapter.json
    write(scheduler.weights("acme"), "out/acme", "native")  # a job's weights as the scheduler holds them
    spec, adapters = load("out/acme")
    with attached(model, spec, adapters):                   # any kind (Houlsby, AdaLink, ...) for inference
        model.generate(...)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from .adapters.base import Adapter, AdapterSpec, build_adapter, load_params, param_shapes, params_of
from .adapters.lowrank import LowRank
from .files import atomic_dir
from .job import JobSpec
from .sites import KINDS, Site

if TYPE_CHECKING:
    from .control.records import JobWeights

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


HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")  # PEFT's task types that keep the classifier head in `modules_to_save`
HEAD_NAMES = ("classifier", "score")  # where PEFT looks for that head (its own default for these tasks)


def peft_task_type(model) -> str | None:
    """PEFT's `task_type` for a base model: CAUSAL_LM, SEQ_2_SEQ_LM, or None (a plain PeftModel).

    A classifier's export says None by default: loaded onto the same base checkpoint, head included,
    it gives the same logits. `save_peft(..., task_type="SEQ_CLS")` (or TOKEN_CLS) writes the head's
    weights in `modules_to_save`, as PEFT's loaders for those tasks expect.
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

    With `model` (the base), `task_type` and `base_model` default to what it is. `task_type` SEQ_CLS
    or TOKEN_CLS needs `model`: its head (`classifier` or `score`, frozen in colaflow) is written in
    `modules_to_save`, so PEFT's AutoPeftModelForSequenceClassification loads it with the same logits.
    """
    if task_type in HEAD_TASKS and model is None:
        raise ValueError(f"`task_type` {task_type!r} keeps the classifier head in `modules_to_save`: pass "
                         "`model=` (the base model, head included) so its weights go with the adapter")
    if model is not None:
        task_type = task_type or peft_task_type(model)
        base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if not adapters:
        raise ValueError("no adapters to export")
    specs = {a.spec for a in adapters.values()}
    other = sorted(n for n, a in adapters.items() if not isinstance(a.spec, LowRank))
    if other:  # e.g. a classification job's head (`score`), a linear adapter with its bias
        kinds = sorted({adapters[n].spec.kind for n in other})
        named = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
        raise ValueError(f"PEFT export needs lowrank adapters; {named} "
                         f"{'has' if len(other) == 1 else 'have'} {'/'.join(kinds)} adapters, which a PEFT LoRA "
                         "directory cannot hold: export in the native format (format='native'; the CLI's "
                         "--format native), "
                         "which colaflow.export.load reads")
    if len(specs) != 1:
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
    heads = _heads(model, task_type)
    for head, module in heads.items():
        for p, v in module.state_dict().items():
            tensors[f"base_model.model.{head}.{p}"] = v
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": sorted(adapters), "fan_in_fan_out": kinds == {"conv1d"},
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": sorted(heads) or None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return _write_dir(path, {"adapter_config.json": config, "adapter_model.safetensors": tensors})


def _heads(model, task_type: str | None) -> dict[str, torch.nn.Module]:
    """The classifier head(s) a SEQ_CLS / TOKEN_CLS export carries: {name: module} ({} for other tasks)."""
    if task_type not in HEAD_TASKS:
        return {}
    heads = {n: getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)}
    if not heads:
        raise ValueError(f"`task_type` {task_type!r}: {type(model).__name__} has no `classifier` or `score` "
                         "head for `modules_to_save`")
    return heads


def save(adapters: dict[str, Adapter], spec: JobSpec, path: str | os.PathLike,
         versions: dict[str, int] | None = None) -> Path:
    """Write any adapter kind in colaflow's native format (adapter.safetensors + adapter.json)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "job": spec.to_dict(),
            "sites": [a.site.to_dict() for a in adapters.values()], "versions": versions or {}}
    tensors = {f"{name}::{p}": v for name, a in adapters.items() for p, v in a.named_parameters()}
    return _write_dir(path, {"adapter.json": meta, "adapter.safetensors": tensors})


def adapters_of(weights: JobWeights) -> dict[str, Adapter]:
    """A job's weights as adapter modules, by site (what `save` and `save_peft` write)."""
    out = {}
    for name, site in weights.sites.items():
        adapter = build_adapter(weights.spec.adapter, site)
        load_params(adapter, weights.params[name])
        out[name] = adapter.requires_grad_(False)
    return out


def write(weights: JobWeights, path: str | os.PathLike, format: str = "native", model=None,
          base_model: str | None = None) -> Path:
    """Write a job's weights (`Scheduler.weights`) as `native` or `peft` (`model`: the base, for PEFT's
    task type and name)."""
    if format == "native":
        return save(adapters_of(weights), weights.spec, path, weights.versions)
    if format == "peft":
        return save_peft(adapters_of(weights), path, base_model=base_model, model=model)
    raise ValueError(f"`format` must be native or peft, got {format!r}")


def load(path: str | os.PathLike) -> tuple[JobSpec, dict[str, Adapter]]:
    """Read a native export back: the job spec and {site: adapter}."""
    path = Path(path)
    meta_file = path / "adapter.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a colaflow adapter export (no adapter.json)")
    return _read(json.loads(meta_file.read_text()), load_file(str(path / "adapter.safetensors")), str(meta_file))


def _read(meta: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[JobSpec, dict[str, Adapter]]:
    _check_format(meta, where)
    spec = JobSpec.from_dict(meta["job"])
    adapters = {}
    for sd in meta["sites"]:
        site = Site.from_dict(sd)
        a = build_adapter(spec.adapter, site)
        load_params(a, {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == site.name})
        adapters[site.name] = a
    return spec, adapters


# Continuing a job from an export (`init=`): the export travels as one blob, the job's adapters start
# from its parameters; the optimizer and LR schedule start fresh (an export carries no optimizer state).
# A blob comes from a tenant: everything it declares is checked against the job from its metadata and
# the safetensors header before a byte of tensor is made, so what it costs is bounded by its own size.

MAX_INIT_META = 4 << 20  # adapter.json text, and the safetensors header: ~200 bytes a site
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def init_blob(path: str | os.PathLike) -> bytes:
    """A native export as the bytes `SubmitJobRequest.init` carries (checked by `init_params` on arrival)."""
    path = Path(path)
    if not (path / "adapter.json").exists() or not (path / "adapter.safetensors").exists():
        raise ValueError(f"`init` {str(path)!r} is not a native colaflow export (adapter.json + "
                         "adapter.safetensors); export one with format=\"native\"")
    return msgpack.packb({"meta": (path / "adapter.json").read_text(),
                          "tensors": (path / "adapter.safetensors").read_bytes()}, use_bin_type=True)


def init_params(spec: JobSpec, blob: bytes, sites: list[Site] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{site: parameters} a job starts from, if the export's adapter is the job's (kind and sizes; its
    dropout may differ) and its sites are `sites` (the job's, resolved; None: the export's own stand in,
    and the scheduler checks them). Every tensor's dtype, shape and byte count is checked against the
    adapter's parameters in the safetensors header before any tensor is read; no adapter is built."""
    meta, raw = _unpack_init(blob)
    _check_format(meta, "`init`")
    job = meta.get("job")
    try:
        theirs = _sans_dropout(AdapterSpec.from_dict(job["adapter"]).to_dict())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"`init`: adapter.json has no valid `job.adapter`: {type(e).__name__}: {e}") from None
    mine = _sans_dropout(spec.adapter.to_dict())
    if mine != theirs:
        raise ValueError(f"`init`: the export's adapter is {theirs}, the job's is {mine}; pass the export's "
                         "adapter (or leave `adapter` out to take it)")
    declared = _declared_sites(meta.get("sites"), sites)
    if sites is not None:
        want = {s.name: s for s in sites}
        if set(declared) != set(want):
            raise ValueError(f"`init`: the export's sites do not match the job's: missing "
                             f"{sorted(set(want) - set(declared))}, extra {sorted(set(declared) - set(want))} "
                             "(same model and `targets` as the exported job?)")
        for name, site in declared.items():
            if site != want[name]:
                raise ValueError(f"`init` site `{name}`: the export's is {site}, the job's is {want[name]}")
        declared = want
    shapes = {}
    for name, site in declared.items():
        try:
            shapes.update({f"{name}::{p}": s for p, s in param_shapes(spec.adapter, site).items()})  # meta device
        except Exception as e:
            raise ValueError(f"`init` site `{name}`: {site} cannot hold a {spec.adapter.kind} adapter: {e}") from None
    _check_tensors(raw, shapes)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in safetensors_load(raw).items():  # bytes checked against the shapes: bounded by the blob
        site, p = key.split("::", 1)
        if not torch.isfinite(v).all():
            raise ValueError(f"`init` site `{site}`: parameter `{p}` holds non-finite values")
        out.setdefault(site, {})[p] = v.to(torch.float32)  # adapters keep float32 (as PEFT's LoRA layers)
    return out


def _unpack_init(blob: bytes) -> tuple[dict, bytes]:
    """(adapter.json as a dict, the safetensors bytes); msgpack bounded so the blob's size bounds its cost."""
    try:
        d = msgpack.unpackb(blob, raw=False, max_map_len=8, max_array_len=0, max_str_len=MAX_INIT_META,
                            max_bin_len=len(blob))
        if not isinstance(d, dict) or not isinstance(d.get("meta"), str) or not isinstance(d.get("tensors"), bytes):
            raise ValueError("expected a map {meta: adapter.json text, tensors: safetensors bytes}")
        meta = json.loads(d["meta"])
    except Exception as e:
        raise ValueError(f"`init` is not a packed native export: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"`init`: adapter.json must be a map, got {type(meta).__name__}")
    return meta, d["tensors"]


def _declared_sites(given, job_sites: list[Site] | None) -> dict[str, Site]:
    """The export's sites by name, each checked for form (its sizes only count once matched to the job's)."""
    limit = len(job_sites) if job_sites is not None else 4096
    if not isinstance(given, list) or not 0 < len(given) <= limit:
        raise ValueError(f"`init`: adapter.json `sites` must be a list of 1 to {limit} sites (the job has "
                         f"{limit}), got {type(given).__name__} of {len(given) if isinstance(given, list) else '?'}")
    out = {}
    for i, sd in enumerate(given):
        try:
            site = Site.from_dict(sd)
            if site.kind not in KINDS or not (0 < site.in_features < 1 << 31 and 0 < site.out_features < 1 << 31):
                raise ValueError(f"kind {site.kind!r} with {site.in_features} -> {site.out_features} features")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"`init`: adapter.json `sites[{i}]` is not a site: {type(e).__name__}: {e}") from None
        if site.name in out:
            raise ValueError(f"`init`: adapter.json names site `{site.name}` twice")
        out[site.name] = site
    return out


def _check_tensors(raw: bytes, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise unless the safetensors header holds exactly `shapes` ({site::param: shape}), as floats whose
    byte ranges lie inside `raw` and hold as many bytes as their shapes need."""
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if not 0 < n <= min(len(raw) - 8, MAX_INIT_META):
        raise ValueError(f"`init`: the safetensors header claims {n} bytes of a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"a {type(header).__name__}")
    except ValueError as e:
        raise ValueError(f"`init`: the safetensors header is not a JSON map: {e}") from None
    header.pop("__metadata__", None)
    if set(header) != set(shapes):
        raise ValueError(f"`init`: the export's tensors do not match the job's adapter: missing "
                         f"{sorted(set(shapes) - set(header))[:8]}, extra {sorted(set(header) - set(shapes))[:8]}")
    body = len(raw) - 8 - n
    for key, entry in header.items():
        site, p = key.split("::", 1)
        where = f"`init` site `{site}`: parameter `{p}`"
        if not isinstance(entry, dict) or entry.get("dtype") not in FLOAT_BYTES:
            got = entry.get("dtype") if isinstance(entry, dict) else entry
            raise ValueError(f"{where} has dtype {str(got)[:16]!r}; expected one of {sorted(FLOAT_BYTES)}")
        if entry.get("shape") != list(shapes[key]):
            raise ValueError(f"{where} has shape {str(entry.get('shape'))[:64]}, the adapter expects "
                             f"{tuple(shapes[key])}")
        span = entry.get("data_offsets")
        need = math.prod(shapes[key]) * FLOAT_BYTES[entry["dtype"]]
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                and 0 <= span[0] <= span[1] <= body and span[1] - span[0] == need):
            raise ValueError(f"{where}: its bytes {str(span)[:64]} are not the {need} its shape needs "
                             f"within the file's {body}")


def _check_format(meta, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{where}: unsupported format {got!r}; expected a native colaflow export ({FORMAT} "
                         f"v{FORMAT_VERSION}; a PEFT directory cannot seed a job)")


def _sans_dropout(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "dropout"}


@contextlib.contextmanager
def attached(model: torch.nn.Module, spec: JobSpec, adapters: dict[str, Adapter]) -> Iterator[torch.nn.Module]:
    """Run `model` with `adapters` (as `load` returns them) on its sites, the way training did: parallel
    or sequential, token types included; e.g. `model.generate(...)` inside. Nothing stays behind."""
    from .engine.host import Host  # the same site hooks as the server's forward: one way to apply an adapter

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
