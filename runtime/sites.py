"""Sites: the modules of a frozen base model whose output an adapter may change.

    sites = find_sites(model)                      # the family's defaults (llama: q_proj, v_proj)
    sites = find_sites(model, ["c_attn"])          # PEFT-style suffixes
    sites = find_sites(model, r".*\\.(q|v)_proj")  # or one regex, matched against the full name
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

# Default target modules per model family (HF `model_type`), as PEFT's LoRA defaults and the ColA paper have them.
_QV, _QUERY_VALUE, _FUSED = ["q_proj", "v_proj"], ["query", "value"], ["query_key_value"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                     "gemma2", "gemma3_text", "stablelm", "opt", "gptj", "gpt_neo", "bart", "mbart", "olmo", "olmo2",
                     "granite", "cohere", "starcoder2", "smollm3"], _QV),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "distilroberta"],
                    _QUERY_VALUE),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon", "chatglm", "RefinedWeb", "RefinedWebModel"], _FUSED),
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"], "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "phi3": ["qkv_proj"],
    "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
}
# An unknown family: the first of these whose every suffix names a module of the model.
_FALLBACK = [_QV, _QUERY_VALUE, _FUSED, ["c_attn"], ["qkv_proj"], ["Wqkv"], ["q", "v"]]


def default_targets(model: nn.Module) -> list[str]:
    """The family's default target modules; for a family not in the table, the first usual attention
    projection names the model has; else an error listing the names it has."""
    family = family_of(model)
    if family in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[family]
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)}
    for targets in _FALLBACK:
        if set(targets) <= leaves:
            return targets
    raise ValueError(f"no default `target_modules` for model family {family!r}: pass them explicitly; this model's "
                     f"adaptable modules end in {sorted(leaves)[:16]}")

KINDS = ("linear", "conv1d", "conv2d", "embedding")


@dataclass(frozen=True)
class Site:
    """One adapted module: its qualified name, kind and dimensions."""

    name: str
    kind: str  # one of KINDS
    in_features: int  # for embedding: num_embeddings
    out_features: int  # for embedding: embedding_dim
    conv: dict = field(default_factory=dict, compare=False)  # kernel_size, stride, padding, dilation, groups

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "conv": dict(self.conv)}

    @classmethod
    def from_dict(cls, d: dict) -> Site:
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("conv", {}).items()}
        return cls(d["name"], d["kind"], int(d["in_features"]), int(d["out_features"]), conv)


def family_of(model: nn.Module) -> str | None:
    """The model family (`llama`, `gpt2`, `bert`, …) from its HF config, if it has one."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def site_of(name: str, module: nn.Module) -> Site:
    """Describe `module` as a site, or raise if colaflow cannot adapt its kind."""
    if isinstance(module, nn.Linear):
        return Site(name, "linear", module.in_features, module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # HF GPT-2: weight (in, out)
        return Site(name, "conv1d", module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"site `{name}` is a grouped Conv2d (groups={module.groups}); "
                             "colaflow adapts only groups=1 convolutions")
        conv = {"kernel_size": tuple(module.kernel_size), "stride": tuple(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
                "dilation": tuple(module.dilation)}
        return Site(name, "conv2d", module.in_channels, module.out_channels, conv)
    if isinstance(module, nn.Embedding):
        return Site(name, "embedding", module.num_embeddings, module.embedding_dim,
                    {"padding_idx": module.padding_idx})
    raise TypeError(f"site `{name}` is a {type(module).__name__}; colaflow adapts nn.Linear, "
                    "HF Conv1D, nn.Conv2d and nn.Embedding modules")


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or type(module).__name__ == "Conv1D"


def find_sites(model: nn.Module, target_modules: list[str] | str | None = None) -> list[Site]:
    """The sites of `model` selected by PEFT-style `target_modules` (suffixes or one regex)."""
    if target_modules is None:
        target_modules = default_targets(model)
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"`target_modules` {target_modules!r} is not a valid regex: {e}") from None
        why = _slow_regex(target_modules)
        if why:  # the server matches it against every module name: it must not take exponential time
            raise ValueError(f"`target_modules` regex {target_modules[:80]!r} {why}: list module-name suffixes, "
                             "or write a simpler pattern (e.g. r'.*\\.(q|v)_proj')")
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"`target_modules` regex {target_modules!r} matches no module; "
                             f"module names look like {_near(target_modules, names)}")
    else:
        if not isinstance(target_modules, (list, tuple)) or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"`target_modules` must be a list of module-name suffixes or one regex string, "
                             f"got {str(target_modules)[:80]}")
        if not target_modules:
            raise ValueError("`target_modules` is empty")
        chosen = []
        for target in target_modules:
            hits = [n for n in names if n == target or n.endswith("." + target)]
            if not hits:
                raise ValueError(f"`target_modules` entry {target!r} matches no module; "
                                 f"near matches: {_near(target, names)}")
            chosen += hits
        chosen = sorted(set(chosen), key=names.index)
    return [site_of(n, modules[n]) for n in chosen]


MAX_REGEX_CHARS, MAX_REGEX_REPEATS, MAX_REGEX_PATHS = 256, 3, 4


def _slow_regex(pattern: str) -> str:
    """Why matching `pattern` could take exponential (or high-polynomial) time, or "": a repeat inside
    a repeat or around an alternation (`(a+)+`, `(a|a)*`), more than a few variable repeats (`?`
    included: `.?.?.?.?x`, `.*.*.*.*x`), or alternations whose choices multiply past a few (`(.|.)(.|.)(.|.)x`).
    Python's engine holds the GIL through a match, so the shape, not a timer, must bound it."""
    if len(pattern) > MAX_REGEX_CHARS:
        return f"is longer than {MAX_REGEX_CHARS} characters"
    try:
        from re import _constants as c  # Python 3.11+
        from re import _parser as p
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as c
        import sre_parse as p
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT) + ((c.POSSESSIVE_REPEAT,) if hasattr(c, "POSSESSIVE_REPEAT") else ())

    paths = [1]  # the product of the alternations' choices

    simple = (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN, c.AT)

    def walk(items, inside: bool) -> int:
        count = 0
        for op, av in items:
            if op in repeats:
                lo, hi, sub = av
                if hi != lo and inside:  # a choice of how many (`?`, `*`, `{m,n}`) inside a repeat, `{n}` included
                    raise ValueError("repeats a group that itself repeats")
                count += (hi != lo) + walk(sub, inside or hi > 1)
            elif op is c.BRANCH:
                if inside:
                    raise ValueError("repeats an alternation")
                paths[0] *= len(av[1])
                count += sum(walk(b, inside) for b in av[1])
            elif op is c.SUBPATTERN:
                count += walk(av[-1], inside)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                count += walk(av[1], inside)
            elif op not in simple:  # atomic groups, conditionals, back-references: no module name needs them
                raise ValueError(f"uses {str(op).lower()}, which target regexes do not take")
        return count
    try:
        n = walk(p.parse(pattern), False)
    except ValueError as e:
        return str(e)
    if n > MAX_REGEX_REPEATS:
        return f"has {n} variable repeats (at most {MAX_REGEX_REPEATS})"
    return f"has alternations of {paths[0]} paths (at most {MAX_REGEX_PATHS})" if paths[0] > MAX_REGEX_PATHS else ""


def _near(target: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(target, leaves, n=5, cutoff=0.4)
    close += difflib.get_close_matches(target, names, n=3, cutoff=0.5)
    return close or leaves[:8]


def input_embedding_name(model: nn.Module) -> str:
    """The qualified name of the model's token-embedding module (`model.embed_tokens` for Llama)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    for name, mod in model.named_modules():
        if emb is not None and mod is emb:
            return name
    raise ValueError(f"{type(model).__name__} does not say which module embeds its tokens "
                     "(no `get_input_embeddings`); pass `target_modules` explicitly")


def site_module(model: nn.Module, site: Site | str) -> nn.Module:
    """The module of `model` at `site`."""
    name = site.name if isinstance(site, Site) else site
    return model.get_submodule(name)


def check_shape(site: Site, name: str, tensor: torch.Tensor, role: str) -> None:
    """Raise if `tensor` (a site's input `x` or output gradient `g`) does not fit `site`."""
    if role == "x" and site.kind == "embedding":
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"site `{site.name}`: `{name}` must hold token ids, got {tensor.dtype}")
        return
    dim = 1 if site.kind == "conv2d" else -1
    want = site.in_features if role == "x" else site.out_features
    if tensor.dim() < 2 or tensor.shape[dim] != want:
        raise ValueError(f"site `{site.name}`: `{name}` has shape {tuple(tensor.shape)}, "
                         f"expected {'channel' if dim == 1 else 'last'} dim {want}")
