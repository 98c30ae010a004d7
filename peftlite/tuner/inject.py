"""Putting an adapter into a model: plan every change, then make them, undoing all on failure.

`plan_adapter` reads the model and the config and raises on any bad input,
changing nothing; `install` applies a plan (wrap modules, create A and B,
set requires_grad) and, if even allocation fails midway, takes every change
back before the error propagates. Loading (peftlite.io) uses the same two
steps with the modules a file names, so a failed load changes no module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..layers import (
    AdapterState,
    LoraAdapter,
    LoraLayer,
    ModulesToSave,
    make_lora_layer,
)
from ..layers.trainable_tokens import TrainableTokensWrapper
from ..layers.walk import replace_module
from ..variants import variant_for
from .parameters import find_target_parameters, plan_parameter_layers
from .targets import find_modules_to_save, find_targets
from .tokens import TokenTarget, install_tokens, plan_tokens, undo_tokens

MHA_OUT_PROJ = ".base_layer.out_proj"  # where PEFT keeps nn.MultiheadAttention's out_proj LoRA layer


@dataclass
class Plan:
    """What adding one adapter changes: (path, module there now, LoRA layer to hold it), saved modules
    and trainable-token rows."""

    adapter_name: str
    config: LoraConfig
    layers: list[tuple[str, nn.Module, LoraLayer]]
    saved: list[str]
    tokens: list[TokenTarget] = field(default_factory=list)


def plan_layers(model: nn.Module, state: AdapterState, config: LoraConfig, paths: list[str]
                ) -> list[tuple[str, nn.Module, LoraLayer]]:
    """(path, current module, LoRA layer to hold the adapter) per path; raises, changes nothing.

    A path may name a parameter (`<module path>.<parameter>`, target_parameters): its
    wrapper is planned by tuner/parameters.py and held at the module's path.
    """
    parameters = [t for t in find_target_parameters(model, config) if f"{t[0]}.{t[1]}" in paths]
    keys = {f"{path}.{name}" for path, name in parameters}
    layers = []
    for path in (p for p in paths if p not in keys):
        if path.endswith(MHA_OUT_PROJ) and path.removesuffix(MHA_OUT_PROJ) in paths:
            continue  # planned with its nn.MultiheadAttention below
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            existing = getattr(module, "enable_lora", None)
            if existing != config.enable_lora:
                raise ValueError(f"module {path!r} already has LoRA with enable_lora={existing!r}; a new adapter "
                                 f"must use the same, got {config.enable_lora!r}")
            layer = module
        else:
            layer = make_lora_layer(path, module, state, config.enable_lora)
            if config.fan_in_fan_out and not getattr(layer, "fan_in_fan_out", True):
                warnings.warn(f"fan_in_fan_out=True ignored for {path!r}, a {type(module).__name__} whose weight "
                              "is out × in, as PEFT does", stacklevel=4)
        layer.factor_shapes(config.rank_for(path))
        layer.check_init(config.init_lora_weights, config.rank_for(path))
        layers.append((path, module, layer))
        out_layer = getattr(layer, "out_layer", None)  # nn.MultiheadAttention: PEFT adapts its out_proj too
        if out_layer is not None:
            layers.append((path + MHA_OUT_PROJ, layer.base_layer.out_proj, out_layer))
    return layers + plan_parameter_layers(model, state, config, parameters)


def plan_adapter(model: nn.Module, state: AdapterState, adapter_name: str, config: LoraConfig,
                 existing: dict[str, LoraConfig]) -> Plan:
    """Validate adding `adapter_name` with `config` to `model` (ValueError on any problem), changing nothing."""
    if existing and (config.bias != "none" or any(c.bias != "none" for c in existing.values())):
        raise ValueError(f"adapter {adapter_name!r}: only one adapter may train biases (bias={config.bias!r}, "
                         f"loaded: {sorted(existing)}); two would train one shared bias: expected bias='none'")
    saved = find_modules_to_save(model, config)
    for path in saved:
        if any(isinstance(m, LoraLayer) for m in model.get_submodule(path).modules()):
            raise ValueError(f"modules_to_save entry {path!r} already has LoRA layers: expected a module "
                             "without LoRA (delete the adapters on it first)")
    # As in PEFT, a module trained in full (modules_to_save) takes no LoRA of its own.
    targets = [p for p in find_targets(model, config) if not any(p == s or p.startswith(s + ".") for s in saved)]
    if not targets and not config.target_parameters:
        raise ValueError(f"target_modules={config.target_modules!r} selects only modules in modules_to_save "
                         f"{saved!r}: expected at least one other module")
    tokens = plan_tokens(model, config, targets, saved)
    targets += [f"{path}.{name}" for path, name in find_target_parameters(model, config)]
    return Plan(adapter_name, config, plan_layers(model, state, config, targets), saved, tokens)


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """float32 over a 16-bit base (PEFT's autocast_adapter_dtype): small updates must not round away."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype if base_dtype.is_floating_point else torch.float32


def install(model: nn.Module, state: AdapterState, plan: Plan, init: bool | str | None,
            autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, first: bool = False) -> None:
    """Apply a plan. init=None leaves A and B uninitialised for a loader that fills them;
    low_cpu_mem_usage puts them on the meta device for the loader to replace.

    Input errors were all raised by the plan; what can still fail here is
    allocation, and then every change is undone before the error propagates.
    """
    config = plan.config
    touched = list(model.parameters()) if first else (
        [p for n, p in model.named_parameters() if n.endswith("bias")] if config.bias != "none" else [])
    trainable = [(param, param.requires_grad) for param in touched]
    wrapped = {path for path in plan.saved if isinstance(model.get_submodule(path), ModulesToSave)}
    wrapped_tokens = {t.path for t in plan.tokens if isinstance(model.get_submodule(t.path), TrainableTokensWrapper)}
    try:
        _apply(model, state, plan, init, autocast_adapter_dtype, low_cpu_mem_usage, first)
        install_tokens(model, state, plan.tokens, plan.adapter_name,  # rows: float32 over a 16-bit base, as PEFT
                       lambda base: adapter_dtype(base, autocast_adapter_dtype), not plan.config.inference_mode)
    except BaseException:
        undo_tokens(model, plan.tokens, plan.adapter_name, wrapped_tokens)
        _undo(model, plan, wrapped, trainable)
        raise


def _apply(model: nn.Module, state: AdapterState, plan: Plan, init: bool | str | None,
           autocast_adapter_dtype: bool, low_cpu_mem_usage: bool, first: bool) -> None:
    name, config = plan.adapter_name, plan.config
    trainable = not config.inference_mode
    if first:
        model.requires_grad_(False)
    variant = variant_for(config)
    for path, module, layer in plan.layers:
        if layer is not module:
            layer.training = module.training  # a new wrapper keeps its base's mode: no dropout in eval
            replace_module(model, path, layer)
        base_weight = layer.base_weight_reference()
        key = layer.pattern_key(layer.config_key(path))
        record = LoraAdapter(config.rank_for(key), config.alpha_for(key), config.scaling_for(key), variant,
                             config.merge_weights, config.lora_bias)
        layer.add_adapter(name, record, config.lora_dropout, init,
                          dtype=adapter_dtype(base_weight.dtype, autocast_adapter_dtype),
                          device=torch.device("meta") if low_cpu_mem_usage else None)
        for container in (layer.lora_A, layer.lora_B, layer.lora_embedding_A, layer.lora_embedding_B,
                          layer.lora_dropout, getattr(layer, "lora_magnitude_vector", {})):
            if name in container:
                container[name].requires_grad_(trainable)
                if isinstance(container[name], nn.Module):
                    container[name].train(layer.training)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(trainable)
    for path in plan.saved:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, state)
            module.training = module.original_module.training
            replace_module(model, path, module)
        module.add_adapter(name)
        module.modules_to_save[name].requires_grad_(trainable)
    if config.bias == "all":
        for param_name, param in model.named_parameters():
            # a saved module's original stays frozen (its copy trains in full), as in PEFT
            if (param_name.endswith("bias") and ".modules_to_save." not in param_name
                    and ".original_module." not in param_name):
                param.requires_grad_(trainable)


def _undo(model: nn.Module, plan: Plan, wrapped: set[str], trainable: list[tuple[nn.Parameter, bool]]) -> None:
    """Take back a partial `_apply`: adapters, new wrappers, requires_grad flags."""
    name = plan.adapter_name
    for path, module, layer in reversed(plan.layers):  # nested wrappers at one path come off outermost first
        layer.delete_adapter(name)
        if layer is not module and model.get_submodule(path) is layer:
            replace_module(model, path, module)
    for path in plan.saved:
        current = model.get_submodule(path)
        if isinstance(current, ModulesToSave):
            current.delete_adapter(name)
            if path not in wrapped:
                replace_module(model, path, current.original_module)
    for param, requires_grad in trainable:
        param.requires_grad_(requires_grad)
