"""LoRA layers, and the one table that maps a base layer's type to its LoRA class.

The lookup is by exact type: a subclass of nn.Linear (a quantized linear, a
custom layer) is never treated as a float nn.Linear, it gets a clear error
naming its class instead, unless it is listed here itself.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import AdapterState, LoraAdapter, LoraLayer, RecordView
from .conv import Conv, Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear, MergedLinear, linear_features
from .mha import MultiheadAttention
from .mixed import Routing, active_routing
from .modules_to_save import ModulesToSave
from .param_wrapper import ParamWrapper
from .quantized import QUANTIZED_TYPE_NAMES, QuantizedLinear, is_quantized_linear

__all__ = [
    "AdapterState", "LoraAdapter", "LoraLayer", "RecordView", "Linear", "MergedLinear", "Embedding", "Conv",
    "Conv1d", "Conv2d", "Conv3d", "ModulesToSave", "Routing", "active_routing", "LORA_CLASSES", "make_lora_layer",
    "is_supported", "linear_features", "LINEAR_TYPES", "ParamWrapper", "MultiheadAttention", "QuantizedLinear",
    "is_quantized_linear",
]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, Conv1D)

LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    **{t: Linear for t in LINEAR_TYPES},
    nn.Embedding: Embedding,
    nn.Conv1d: Conv,
    nn.Conv2d: Conv,
    nn.Conv3d: Conv,
    nn.MultiheadAttention: MultiheadAttention,
}


def is_supported(module: nn.Module) -> bool:
    return type(module) in LORA_CLASSES or is_quantized_linear(module)


def make_lora_layer(path: str, base: nn.Module, state: AdapterState, enable_lora: list[bool] | None) -> LoraLayer:
    """A new LoRA layer around `base` (at `path`, for messages); ValueError if its type takes no LoRA."""
    lora_class = QuantizedLinear if is_quantized_linear(base) else LORA_CLASSES.get(type(base))
    if lora_class is None:
        supported = sorted({t.__name__ for t in LORA_CLASSES}) + list(QUANTIZED_TYPE_NAMES)
        raise ValueError(f"module {path!r} of type {type(base).__module__}.{type(base).__name__} cannot take "
                         f"LoRA: supported types are {supported}")
    if enable_lora is not None:
        if lora_class is not Linear:
            raise ValueError(f"enable_lora is for fused linear projections, but {path!r} is a "
                             f"{type(base).__name__}")
        return MergedLinear(base, state, enable_lora)
    return lora_class(base, state)
