"""PEFT's `get_layer_status` / `get_model_status`: what each LoRA module reports, and the model-wide summary.

The dataclasses have PEFT's field names and meanings, so code that reads them
(`status.enabled`, `status.merged_adapters == "irregular"`, ...) runs unchanged.
"Irregular" is PEFT's word for layers that disagree; with one `AdapterState`
per model peftlite layers cannot disagree on enabled/active, but the summary
still computes it per layer, as PEFT does, since a user may edit a layer.
Depends on layers/ and tuner/ only, so peft_model.py can import it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

from torch import nn
from transformers import PreTrainedModel

from .layers import Conv, LoraLayer, ModulesToSave, QuantizedLinear
from .layers.trainable_tokens import TrainableTokensLayer
from .tuner import LoraTuner

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclasses.dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_none(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _module_type(module: nn.Module) -> str:
    """PEFT's repr prefix: `lora.Linear`, `lora.Conv2d`, `lora.Linear4bit`, ... and `ModulesToSaveWrapper`.

    Where PEFT has one LoRA class per base type and peftlite one for several
    (Conv, QuantizedLinear), the base type names it, as in PEFT.
    """
    if isinstance(module, ModulesToSave):
        return "ModulesToSaveWrapper"
    if isinstance(module, TrainableTokensLayer):
        return "TrainableTokensLayer"
    per_base = isinstance(module, (Conv, QuantizedLinear))
    return "lora." + type(module.base_layer if per_base else module).__name__


def _adapter_parameters(module: LoraLayer | ModulesToSave | TrainableTokensLayer) -> dict[str, list[nn.Parameter]]:
    if isinstance(module, TrainableTokensLayer):
        return {name: [module.trainable_tokens_delta[name]] for name in module.adapters}
    if isinstance(module, ModulesToSave):
        return {name: list(copy.parameters()) for name, copy in module.modules_to_save.items()}
    return {name: module.adapter_parameters(name) for name in module.adapters}


def _layer_status(name: str, module: LoraLayer | ModulesToSave | TrainableTokensLayer) -> TunerLayerStatus:
    params = _adapter_parameters(module)
    if isinstance(module, ModulesToSave):
        active, merged = module.active_adapters[:1], []  # a saved module runs one copy at a time
    else:
        # as PEFT: every layer reports the model's active list, whether or not it holds each adapter
        active, merged = list(module.state.active), list(module.merged_adapters)
    backend = getattr(module, "quantization_backend", None)
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not module.state.disabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _all_or_none([p.requires_grad for p in ps]) for k, ps in params.items() if ps},
        available_adapters=sorted(params),
        devices={k: sorted({p.device.type for p in ps}) for k, ps in params.items() if ps},
        quantization_backend=getattr(backend, "backend_name", backend),
    )


def _root(model: nn.Module) -> nn.Module:
    """Where LoRA modules are looked for: a LoraModel's tuner (PEFT's names start `model.`), else the model."""
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, LoraTuner) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per LoRA layer and per modules_to_save wrapper, in module order.

    Raises ValueError when `model` has none (as PEFT).
    """
    status = [_layer_status(name, module) for name, module in _root(model).named_modules()
              if isinstance(module, (LoraLayer, ModulesToSave, TrainableTokensLayer))]
    if not status:
        raise ValueError(f"model of type {type(model).__name__} has no LoRA layers: expected a LoraModel or a "
                         "model with adapters injected (inject_adapter_in_model)")
    return status


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    counts = getattr(model, "get_nb_trainable_parameters", None)
    if callable(counts) and isinstance(_root(model), LoraTuner):
        return counts()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _merged_summary(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged somewhere; "irregular" if one of them is unmerged on a layer that holds it."""
    merged = {name for status in layers for name in status.merged_adapters}
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged:
            return "irregular"
    return sorted(merged)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of `get_layer_status`, with PEFT's fields and "irregular" rules."""
    root = _root(model)
    if isinstance(root, LoraTuner):
        base_type, adapter_type = type(root.model).__name__, "LoraModel"  # PEFT's class name for the tuner
        peft_types = {name: str(config.peft_type) for name, config in root.peft_config.items()}
    else:
        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_type, peft_types = "None", {}
    layers = get_layer_status(model)
    trainable, total = _parameter_counts(model)
    enabled = {status.enabled for status in layers}
    active = {tuple(status.active_adapters) for status in layers}
    requires_grad: dict[str, list[bool | Irregular]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            requires_grad[key].append(value)
        for key, types in status.devices.items():
            devices[key].update(types)
    backends = {status.quantization_backend for status in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged_summary(layers),
        requires_grad={key: _all_or_none(values) for key, values in requires_grad.items()},
        available_adapters=sorted({name for status in layers for name in status.available_adapters}),
        devices={key: sorted(types) for key, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
