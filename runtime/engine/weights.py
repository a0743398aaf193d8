"""How the frozen weights are held — dtype, quantization, devices — as far as the capture step cares.

A base may be float32, bf16 or fp16; quantized by bitsandbytes (NF4 / int8, as QLoRA holds it);
or spread over several devices by accelerate's `device_map`, with CPU or disk offload (an
offloaded module's weights sit on the `meta` device until its hook brings them in). The step never
reads a frozen weight itself except to merge, so three questions suffice: on which device does a
module compute, may its weight be merged into, and what does the model hold (for the operator).
"""
from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module, model: nn.Module | None = None) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device when it has one (offloaded
    weights live on `meta` between forwards), else its first parameter's or buffer's device."""
    device = _hook_device(module)
    if device is not None:
        return device
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    if model is not None and getattr(model, "hf_device_map", None):  # a parent holds the hook
        for mod in model.modules():
            if mod is not module and any(m is module for m in mod.modules()):
                device = _hook_device(mod)
                if device is not None:
                    return device
    return torch.device("cpu")


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of `module`'s accelerate hook (an int is a CUDA index), if it has one."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes: the input embedding's device (accelerate moves it on between devices)."""
    try:
        return execution_device(model.get_input_embeddings(), model)
    except (AttributeError, NotImplementedError):
        return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def quantized(module: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for a bitsandbytes layer, else None."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return getattr(state, "quant_type", "nf4")
    if type(module).__name__ == "Linear8bitLt":
        return "int8"
    return None


def mergeable_weight(module: nn.Module) -> bool:
    """Whether W + dW can be formed from the module's own weight: not a quantized or offloaded one."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and quantized(module) is None and weight.device.type != "meta"


def prepare(model: nn.Module) -> None:
    """Make a quantized base compute as PEFT's QLoRA computes it in training. bitsandbytes picks its
    kernels by a layer's train/eval mode: in eval mode a 4-bit layer repacks its weight for a CPU
    kernel with no backward (`gemv_4bit`: every later site gradient would be lost), and an 8-bit
    layer quantizes its input to int8 on the CPU. The server's base is frozen but always trained
    through, so its bitsandbytes layers run in training mode whatever the model's (they have no
    dropout: nothing else changes), and a weight already repacked is unpacked."""
    for module in model.modules():
        if quantized(module) is None:
            continue
        if not getattr(module, "_colaflow_trains", False):
            module.register_forward_pre_hook(_training_kernels)
            module._colaflow_trains = True
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)


def _training_kernels(module: nn.Module, args) -> None:
    module.training = True  # (reset each call: `model.eval()` recurses into it)


def resident_on(model: nn.Module, device: torch.device) -> int:
    """Bytes of the weights and buffers held on `device` now (a device_map's other devices not counted)."""
    same = {id(t): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
            if t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))}
    return sum(same.values())


def describe(model: nn.Module) -> dict:
    """What the server holds: dtype(s), quantization, devices, and the bytes of its weights (those held
    in memory now: `resident_bytes`; an offloaded layer's come in for its forward)."""
    dtypes, devices, quant, nbytes, resident, seen = set(), set(), set(), 0, 0, set()
    for module in model.modules():
        q = quantized(module)
        if q:
            quant.add(q)
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(t) in seen:  # a tied weight (lm_head and the input embedding) is held once
                continue
            seen.add(id(t))
            size = t.numel() * t.element_size()
            nbytes += size
            resident += 0 if t.device.type == "meta" else size  # offloaded: on disk or in a CPU map
            if t.is_floating_point() and isinstance(t, nn.Parameter):  # (buffers: rotary tables and such)
                dtypes.add(str(t.dtype).removeprefix("torch."))
            devices.add(str(execution_device(module, model)))
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        devices |= {str(d) for d in device_map.values()}
    return {"dtype": "/".join(sorted(dtypes)) or "none", "quantization": "/".join(sorted(quant)) or "none",
            "devices": sorted(devices), "weight_bytes": nbytes, "resident_bytes": resident}
