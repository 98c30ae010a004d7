"""PEFT's functional API over state dicts: adapter tensors out and in, the base model's tensors out and in.

`get_peft_model_state_dict` gives exactly what `save_pretrained` writes (PEFT's
file keys, no adapter name inside); `set_peft_model_state_dict` puts such a dict
into an adapter the model already has, checked whole before anything changes.
The base-model pair translates between the wrapped model's names
(`q_proj.base_layer.weight`) and the original ones (`q_proj.weight`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..layers import LoraLayer, ModulesToSave
from ..tuner import LoraTuner
from ..tuner.inject import plan_layers
from .keys import PREFIX, adapter_tensors, checked_extras, set_extras, set_token_rows, take_token_rows
from .loading import (
    LoadResult,
    check_base,
    check_saved,
    check_tensors,
    check_token_rows,
    checked_pair,
    copy_base,
    place,
)

INJECTED_TUNER = "_peftlite_tuner"  # where inject_adapter_in_model leaves the tuner of a bare model


def attach_tuner(model: nn.Module, tuner: LoraTuner) -> None:
    """Let the functional API find `tuner` from the bare `model` inject_adapter_in_model returns.

    Stored outside nn.Module's registry (no submodule cycle, nothing in state_dict);
    `model.peft_config` is set as PEFT sets it.
    """
    object.__setattr__(model, INJECTED_TUNER, tuner)
    model.__dict__["peft_config"] = tuner.peft_config


def attached_tuner(model: nn.Module) -> LoraTuner | None:
    """The tuner `attach_tuner` left on `model`, if any."""
    tuner = model.__dict__.get(INJECTED_TUNER)
    return tuner if isinstance(tuner, LoraTuner) else None


def tuner_of(model: nn.Module) -> LoraTuner:
    """The LoraTuner of a LoraModel, of a model from inject_adapter_in_model, or the tuner itself."""
    for tuner in (model, getattr(model, "base_model", None), model.__dict__.get(INJECTED_TUNER)):
        if isinstance(tuner, LoraTuner):
            return tuner
    raise ValueError(f"model of type {type(model).__name__} is invalid: expected a peftlite LoraModel or a model "
                     "returned by inject_adapter_in_model")


def _key_prefix(model: nn.Module) -> str:
    """PEFT's keys start `base_model.model.` for a PeftModel; a bare injected model's keys are its own paths."""
    return "" if INJECTED_TUNER in model.__dict__ else PREFIX


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, Tensor]:
    """Adapter `adapter_name`'s tensors under PEFT's file keys (`base_model.model.<path>.lora_A.weight`).

    state_dict (PEFT's keyword): the model's state_dict as gathered elsewhere (FSDP, DeepSpeed
    ZeRO-3, accelerate's get_state_dict); its values replace the model's own, matched by
    in-memory name (`<path>.lora_A.<adapter>.weight` for the file's `<path>.lora_A.weight`).
    """
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model
    tuner = tuner_of(model)
    tuner.check_adapter(adapter_name)
    tensors = adapter_tensors(tuner.model, tuner.peft_config[adapter_name], adapter_name)
    prefix = _key_prefix(model)
    if prefix != PREFIX:
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    if state_dict is not None:
        given = {_file_key(k, adapter_name): v for k, v in state_dict.items()}
        tensors = {k: given[k] if k in given and given[k].shape == v.shape else v for k, v in tensors.items()}
    return tensors


def _file_key(key: str, adapter_name: str) -> str:
    """An in-memory state_dict key as PEFT's file names it: the adapter name (and a saved module's infix) gone."""
    key = key.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")
    return key.removesuffix(f".{adapter_name}")


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Copy PEFT-keyed tensors into the existing adapter `adapter_name`.

    Every key must map to a module of this model and fit its shape (or, with
    ignore_mismatched_sizes, mismatched pairs are skipped and reported as missing).
    Returns PEFT's (missing_keys, unexpected_keys) over the adapter's in-memory names.
    """
    tuner = tuner_of(model)
    tuner.check_adapter(adapter_name)
    config: LoraConfig = tuner.peft_config[adapter_name]
    source = "state dict"
    check_tensors(peft_model_state_dict, source)
    tensors = dict(peft_model_state_dict)
    token_rows = take_token_rows(tuner.model, config, tensors, source)
    check_token_rows(tuner, adapter_name, config, source)
    pairs, saved, base = place(tuner.model, config, tensors, source)
    layers = {path: layer for path, _, layer in plan_layers(tuner.model, tuner.adapter_state, config, list(pairs))
              if isinstance(layer, LoraLayer) and adapter_name in layer.adapters}
    unexpected = sorted(set(pairs) - set(layers))
    weights, extras, skipped = {}, {}, []
    for path, layer in layers.items():
        try:
            weights[path] = checked_pair(path, layer, pairs[path], layer.adapters[adapter_name].r, source)
            extras[path] = checked_extras(path, layer, pairs[path], config, source)
        except ValueError:
            if not ignore_mismatched_sizes:
                raise
            skipped.append(path)
    for path, state in saved.items():
        check_saved(path, tuner.model.get_submodule(path), state, source)
    changed = check_base(base, source)
    with tuner.adapter_state.lock:
        for path, pair in weights.items():
            layers[path].set_factors(adapter_name, *pair, in_place=not low_cpu_mem_usage)
            set_extras(layers[path], adapter_name, extras[path], in_place=not low_cpu_mem_usage)
        for path, state in saved.items():
            module = tuner.model.get_submodule(path)
            if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].load_state_dict(state, strict=False)
        copy_base(changed, source)
        set_token_rows(tuner.model, adapter_name, token_rows)
    if skipped:
        warnings.warn(f"set_peft_model_state_dict: ignore_mismatched_sizes=True skipped {len(skipped)} modules whose "
                      f"shapes differ from adapter {adapter_name!r}, e.g. {skipped[:3]}; they keep their weights",
                      stacklevel=2)
    prefix = _key_prefix(model)  # the keys as model.state_dict() names them, as PEFT reports them
    missing = [f"{prefix}{path}.{part}.{adapter_name}.weight"
               for path, layer in _adapter_layers(tuner, adapter_name) if path not in weights
               for part in ("lora_A", "lora_B")]
    return LoadResult(missing_keys=missing,
                      unexpected_keys=[f"{prefix}{path}.lora_A.{adapter_name}.weight" for path in unexpected])


def _adapter_layers(tuner: LoraTuner, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(path, layer) for path, layer in tuner.lora_layers() if adapter_name in layer.adapters]


def _is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts or "trainable_tokens_delta" in parts


def _original_key(key: str) -> str:
    """`a.q_proj.base_layer.weight` -> `a.q_proj.weight`; `head.original_module.weight` -> `head.weight`;
    `embed.token_adapter.base_layer.weight` -> `embed.weight`."""
    return ".".join(p for p in key.split(".") if p not in ("base_layer", "original_module", "token_adapter"))


def get_base_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's tensors under their original names, adapters left out."""
    tuner = tuner_of(model)
    return {_original_key(k): v for k, v in tuner.model.state_dict().items() if not _is_adapter_key(k)}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True) -> LoadResult:
    """Load base-model tensors given under their original names into the wrapped model."""
    tuner = tuner_of(model)
    wrapped = {_original_key(k): k for k in tuner.model.state_dict() if not _is_adapter_key(k)}
    unknown = sorted(set(state_dict) - set(wrapped))
    missing = sorted(set(wrapped) - set(state_dict))
    if strict and (unknown or missing):
        raise ValueError(f"state_dict does not match the base model: unexpected {unknown[:5]}, missing "
                         f"{missing[:5]}: expected the base model's own keys")
    renamed = {wrapped[k]: v for k, v in state_dict.items() if k in wrapped}
    with torch.no_grad():
        tuner.model.load_state_dict(renamed, strict=False)
    return LoadResult(missing_keys=missing, unexpected_keys=unknown)
