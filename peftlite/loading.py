"""Putting a saved adapter into a model: load it as a new adapter, or hotswap it into one.

Both validate everything first — every key maps to a module (peft_keys'
index), every shape and rank matches the config, MergedLinear blocks are
block-diagonal, modules_to_save are complete — and only then change the
model, so a failed load or hotswap leaves every module as it was.

The modules that get LoRA are the ones the file holds weights for (the
config's target_modules chose them when the adapter was trained), so
options that only steer selection (layers_pattern, exclude_modules, ...)
cannot make a load disagree with its file. Biases and embedding tables a
PEFT file carries go into the base model, as PEFT puts them, with a warning
when they differ from what is there.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from .config import LoraConfig
from .files import read_adapter
from .layers import LoraLayer, MergedLinear, ModulesToSave
from .peft_keys import Slot, build_index, file_prefix, file_shapes, fused_from_file, saved_paths, walk


HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only")
# PEFT load_adapter options about memory or placement only: accepted for drop-in use, with no effect here.
PEFT_LOAD_OPTIONS = ("low_cpu_mem_usage", "autocast_adapter_dtype", "ephemeral_gpu_offload", "torch_device")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Hub options of a load call; PEFT's placement options dropped with a warning, others refused."""
    unknown = sorted(k for k in kwargs if k not in HUB_KWARGS and k not in PEFT_LOAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown load options {unknown}: expected any of {list(HUB_KWARGS)}")
    ignored = sorted(k for k in kwargs if k in PEFT_LOAD_OPTIONS)
    if ignored:
        warnings.warn(f"ignoring PEFT load options {ignored}: peftlite puts adapters on the base layer's "
                      "device and dtype and never allocates twice", stacklevel=4)
    return {k: v for k, v in kwargs.items() if k in HUB_KWARGS}


def _weights_device(lora_model) -> torch.device:
    """Read weights straight onto the model's device (one copy fewer on a GPU); never onto "meta"."""
    param = next(lora_model.base_model.parameters(), None)
    return param.device if param is not None and param.device.type != "meta" else torch.device("cpu")


def _place(lora_model, config: LoraConfig, tensors: dict[str, Tensor], source: str
           ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Sort a file's tensors by destination: ({path: {"A","B"}}, {path: state}, [(base tensor, value)]).

    ValueError for a key that maps to nothing in this model, and when no LoRA weight is present.
    """
    index = build_index(lora_model.base_model, config, file_prefix(list(tensors)))
    pairs: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, dict[str, Tensor]] = {}
    base: list[tuple[Tensor, Tensor]] = []
    unknown = []
    for name, tensor in tensors.items():
        slot: Slot | None = index.get(name)
        if slot is None:
            unknown.append(name)
        elif slot.kind == "lora":
            pairs.setdefault(slot.path, {})[slot.part] = tensor
        elif slot.kind == "saved":
            saved.setdefault(slot.path, {})[slot.part] = tensor
        else:
            base.append((slot.target, tensor))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys match no module of this model, e.g. {unknown[:3]}; "
                         "expected PEFT keys such as 'base_model.model.<module path>.lora_A.weight' "
                         "(is this adapter for another base model?)")
    if not pairs:
        raise ValueError(f"{source}: no LoRA weights (lora_A/lora_B keys) found: expected at least one pair")
    return pairs, saved, base


def _checked_pair(path: str, layer: LoraLayer, parts: dict[str, Tensor], r: int, source: str
                  ) -> tuple[Tensor, Tensor]:
    """A file's (A, B) for `path` checked against rank r, with B in our layout (MergedLinear: unblocked)."""
    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        raise ValueError(f"{source}: module {path!r} has no lora_{missing[0]} weight: expected both A and B")
    for part, expected in zip(("A", "B"), file_shapes(layer, r)):
        if tuple(parts[part].shape) != expected:
            raise ValueError(f"{source}: lora_{part} of {path!r} has shape {tuple(parts[part].shape)}, expected "
                             f"{expected} (r={r} from the config, layer {type(layer).__name__})")
    if isinstance(layer, MergedLinear):
        return parts["A"], fused_from_file(layer, parts["B"], f"{source}: lora_B of {path!r}")
    return parts["A"], parts["B"]


def _check_saved(path: str, module, state: dict[str, Tensor], source: str) -> None:
    original = module.original_module if isinstance(module, ModulesToSave) else module
    own = original.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: modules_to_save {path!r} lacks {missing}: expected its full state")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"{source}: {path}.{name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(own[name].shape)}")


def _check_base(base: list[tuple[Tensor, Tensor]], source: str) -> list[tuple[Tensor, Tensor]]:
    """Base-model tensors the file carries, shape-checked; only those that differ need copying."""
    changed = []
    for target, value in base:
        if target.shape != value.shape:
            raise ValueError(f"{source}: a base-model tensor has shape {tuple(value.shape)}, expected "
                             f"{tuple(target.shape)} (resize the base model's embeddings first?)")
        if not torch.equal(target.detach(), value.to(target.device, target.dtype)):
            changed.append((target, value))
    return changed


def _fill(record, lora_A: Tensor, lora_B: Tensor, adopt: bool) -> None:
    """Put A and B into an adapter record.

    adopt=True (a new adapter) takes over the freshly read tensors' storage
    when dtype and device already match, instead of copying all the bytes a
    second time; hotswap (adopt=False) copies in place so the Parameter and
    its storage stay the ones a compiled graph captured.
    """
    with torch.no_grad():
        for param, value in ((record.lora_A, lora_A), (record.lora_B, lora_B)):
            if adopt and value.dtype == param.dtype and value.device == param.device:
                param.data = value
            else:
                param.copy_(value)


def _copy_base(changed: list[tuple[Tensor, Tensor]], source: str) -> None:
    if changed:
        warnings.warn(f"{source}: copied {len(changed)} base-model tensors (biases or embedding weights) that "
                      "differ from the model's into the base model, as PEFT does; they stay after "
                      "delete_adapter and are shared by every adapter", stacklevel=4)
    with torch.no_grad():
        for target, value in changed:
            target.copy_(value)


def load_adapter(lora_model, model_id_or_path: str, adapter_name: str, is_trainable: bool = False,
                 **hub_kwargs: Any) -> None:
    """Read an adapter and add it to `lora_model` as `adapter_name` (LoraModel.load_adapter).

    Order: read and check the config; read the weights; map every key to a
    module; plan the LoRA layers; check shapes, ranks and MergedLinear
    structure; only then mutate (new records left uninitialised, then filled).
    """
    lora_model.check_new_adapter(adapter_name)
    config, tensors, source = read_adapter(model_id_or_path, _weights_device(lora_model), **_hub_kwargs(hub_kwargs))
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    root = lora_model.base_model
    pairs, saved, base = _place(lora_model, config, tensors, source)
    layers = lora_model.plan_layers(config, [(path, root.get_submodule(path)) for path in pairs])
    weights = {path: _checked_pair(path, layer, pairs[path], config.rank_for(path), source)
               for path, _, layer in layers}
    expected_saved = saved_paths(root, config)
    for path in expected_saved:
        _check_saved(path, root.get_submodule(path), saved.get(path, {}), source)
    changed = _check_base(base, source)

    lora_model.install_adapter(adapter_name, config, layers, expected_saved, init=None)
    for path, _, layer in layers:
        _fill(layer.adapters[adapter_name], *weights[path], adopt=True)
    for path in expected_saved:
        # .get: a module with no state (e.g. an activation) has no keys in the file
        root.get_submodule(path).modules_to_save[adapter_name].load_state_dict(saved.get(path, {}), strict=False)
    _copy_base(changed, source)


def hotswap_adapter(lora_model, model_id_or_path: str, adapter_name: str, **hub_kwargs: Any) -> None:
    """Copy an adapter's weights into the existing adapter `adapter_name`, in place.

    The file must cover exactly the same modules with the same ranks; the
    scaling and config follow the new file. No module or parameter is
    replaced, so compiled or captured models keep working.
    """
    lora_model.check_adapter(adapter_name)
    if adapter_name in lora_model.merged_adapters():
        raise ValueError(f"adapter {adapter_name!r} is merged: unmerge_adapter() before hotswapping it")
    old = lora_model.peft_config[adapter_name]
    config, tensors, source = read_adapter(model_id_or_path, **_hub_kwargs(hub_kwargs))
    config = dataclasses.replace(config, inference_mode=old.inference_mode)
    pairs, saved, base = _place(lora_model, config, tensors, source)
    layers: dict[str, LoraLayer] = {}
    copies: dict[str, ModulesToSave] = {}
    for path, module in walk(lora_model.base_model):
        if isinstance(module, LoraLayer) and adapter_name in module.adapters:
            layers[path] = module
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            copies[path] = module
    if set(pairs) != set(layers) or set(saved) != set(copies):
        differ = sorted(set(pairs) ^ set(layers) | set(saved) ^ set(copies))
        raise ValueError(f"{source}: adapter covers other modules than {adapter_name!r} ({differ[:3]}...): "
                         "hotswap needs the same target modules and modules_to_save")
    weights = {}
    for path, layer in layers.items():
        if getattr(layer, "enable_lora", None) != config.enable_lora:
            raise ValueError(f"{source}: enable_lora={config.enable_lora!r} but {path!r} has "
                             f"enable_lora={getattr(layer, 'enable_lora', None)!r}")
        record = layer.adapters[adapter_name]
        weights[path] = _checked_pair(path, layer, pairs[path], config.rank_for(path), source)
        if config.rank_for(path) != record.r:
            raise ValueError(f"{source}: {path!r} has rank {config.rank_for(path)} in the file, expected "
                             f"{record.r} (hotswap needs the same ranks)")
    for path, module in copies.items():
        _check_saved(path, module, saved[path], source)
    changed = _check_base(base, source)

    for path, layer in layers.items():
        record = layer.adapters[adapter_name]
        _fill(record, *weights[path], adopt=False)
        record.scaling = config.scaling_for(path)
        record.dropout = config.lora_dropout
    for path, module in copies.items():
        module.modules_to_save[adapter_name].load_state_dict(saved[path], strict=False)
    _copy_base(changed, source)
    lora_model.peft_config[adapter_name] = config
