"""Training and merging over k-bit (bitsandbytes 4-bit / 8-bit) quantized models: QLoRA's two model-wide helpers.

`prepare_model_for_kbit_training` is PEFT's function of that name, same signature and
effects. `dequantize_and_merge` is the float alternative to `merge_and_unload` on a
quantized base: merging into the packed weights requantizes them (rounding the merged
update away in part), while this returns a plain float model, W + ΔW exactly, that
saves and loads like any transformers model.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ..layers import QuantizedLinear
from ..layers.quantized import bitsandbytes, is_quantized_linear, undo_cpu_inference_packing
from .tuner import LoraTuner

# quantization methods whose parameters PEFT leaves in their dtype (it upcasts every other 16-bit one)
NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Get a quantized transformers model ready for LoRA training, as PEFT's function of this name does.

    1. freeze every parameter (the adapters added afterwards are the trainable ones);
    2. cast every float16/bfloat16 parameter that is not packed 4-bit data to float32 (layer norms,
       embeddings, the output head), unless the model was quantized by GPTQ/AQLM/EETQ/HQQ/torchao;
    3. for a model loaded in 4-bit or 8-bit with `use_gradient_checkpointing`: make the input
       embeddings' output require grad (with reentrant checkpointing, which needs it) and turn on
       gradient checkpointing with `gradient_checkpointing_kwargs`.
    It also puts back into the standard layout any 4-bit weight that bitsandbytes repacked for
    CPU inference (an eval forward does that; its kernel would pass no gradient to the input).

    Returns the same model, changed in place.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = str(getattr(model, "quantization_method", "") or "").rsplit(".", 1)[-1].lower()
    no_upcast = method in NO_UPCAST_METHODS or getattr(model, "hqq_quantized", False)
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    bnb = bitsandbytes()
    for param in model.parameters():
        param.requires_grad_(False)
    if not no_upcast:
        for param in model.parameters():
            packed = bnb is not None and isinstance(param, bnb.nn.Params4bit)
            if param.dtype in (torch.float16, torch.bfloat16) and not packed:
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    undo_cpu_inference_packing(model)
    hf: Any = model  # a transformers PreTrainedModel: these methods are not nn.Module's
    if (loaded_in_kbit or no_upcast) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(hf, "enable_input_require_grads"):
                hf.enable_input_require_grads()
            else:
                hf.get_input_embeddings().register_forward_hook(_output_requires_grad)
        if "gradient_checkpointing_kwargs" in inspect.signature(hf.gradient_checkpointing_enable).parameters:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            if kwargs:
                warnings.warn("gradient_checkpointing_kwargs is not supported by this transformers version: ignored",
                              FutureWarning, stacklevel=2)
            hf.gradient_checkpointing_enable()
    return model


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def dequantize_and_merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
    """Merge adapters into a float copy of a quantized model: every LoRA layer over a bitsandbytes
    base becomes an nn.Linear holding dequantize(W) + ΔW; other LoRA layers merge as in merge_and_unload.

    On a transformers model, the quantized layers no adapter touched are then dequantized too
    (`model.dequantize()`), which also drops the quantization config, so `save_pretrained`
    writes a plain float checkpoint.

    Args:
        model: a LoraModel (or its LoraTuner) over a 4-bit or 8-bit base.
        adapter_names: the adapters to merge (default: the active ones).
        safe_merge: check every merged weight for NaN/Inf first; on one, nothing changes.
        dtype: dtype of the new float layers (default: the model config's dtype if it has one,
            else the dtype the 4-bit weight was quantized from, float32 for 8-bit).
    Returns:
        The base model without LoRA modules (the LoraModel is unloaded, as by merge_and_unload).
    Raises:
        ValueError: `model` is not a LoRA model, an unknown adapter name, or NaN/Inf with safe_merge.
    """
    tuner = model if isinstance(model, LoraTuner) else getattr(model, "base_model", None)
    if not isinstance(tuner, LoraTuner):
        raise ValueError(f"model of type {type(model).__name__} is invalid: expected a LoraModel (get_lora_model's "
                         "result) or its LoraTuner")
    dtype = dtype if dtype is not None else _config_dtype(tuner.model)
    with tuner.adapter_state.lock:
        todo, layers = tuner.merge_plan(adapter_names, safe_merge)
        for layer in layers:
            mine = [n for n in todo if n in layer.adapters]
            if isinstance(layer, QuantizedLinear):
                layer.base_layer = layer.dequantized_base(mine, dtype)
                layer.packed = None
            else:
                layer.merge(adapter_names=mine)
        result: Any = tuner._unwrap(keep_saved_copy=True)
    quantizer = getattr(result, "hf_quantizer", None)
    if quantizer is not None:
        if any(is_quantized_linear(m) for m in result.modules()):
            result = result.dequantize(dtype=dtype)
        else:  # transformers' dequantize fails when no quantized layer is left; drop its config alone
            quantizer.remove_quantization_config(result)
    return result


def _config_dtype(model: nn.Module) -> torch.dtype | None:
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def quantization_kwargs(bits: int | None) -> dict[str, Any]:
    """from_pretrained arguments for a bitsandbytes base (the CLI's --load-in-4bit / --load-in-8bit): QLoRA's
    4-bit nf4 with double quantization, or LLM.int8; on this process's GPU if there is one, else on CPU."""
    if bits is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--load-in-{bits}bit needs bitsandbytes: pip install 'peftlite[quant]'")
    if bits == 4:
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}
