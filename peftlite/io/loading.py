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
import re
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..inits import mutates_base
from ..layers import LoraLayer, MergedLinear, ModulesToSave
from ..layers.walk import walk
from ..tuner import LoraTuner
from ..tuner.inject import Plan, plan_layers
from ..tuner.targets import find_modules_to_save
from ..tuner.tokens import own_token_targets, plan_tokens, token_wrappers
from .files import check_config_matches, read_adapter
from .keys import (
    Slot,
    build_index,
    checked_extras,
    file_prefix,
    file_shapes,
    fused_from_file,
    set_extras,
    set_token_rows,
    take_token_rows,
)

HUB_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only")
# PEFT load options about placement that change nothing on one device: accepted for drop-in use.
PEFT_PLACEMENT_OPTIONS = ("ephemeral_gpu_offload", "torch_device", "device_map", "max_memory", "offload_folder",
                          "offload_dir", "use_safetensors", "key_mapping")


class LoadResult(NamedTuple):
    """What `load_adapter` returns, as PEFT's: keys the model expected but the file lacked, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Hub options of a load call; PEFT's placement options dropped, anything else refused."""
    unknown = sorted(k for k in kwargs if k not in HUB_KWARGS and k not in PEFT_PLACEMENT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown load options {unknown}: expected any of {list(HUB_KWARGS)} "
                         f"(or PEFT's {list(PEFT_PLACEMENT_OPTIONS)})")
    return {k: v for k, v in kwargs.items() if k in HUB_KWARGS}


def _weights_device(root: nn.Module) -> torch.device:
    """Read weights straight onto the model's device (one copy fewer on a GPU); never onto "meta"."""
    param = next(root.parameters(), None)
    return param.device if param is not None and param.device.type != "meta" else torch.device("cpu")


def place(root: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str
           ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Sort a file's tensors by destination: ({path: {"A","B"}}, {path: state}, [(base tensor, value)]).

    ValueError for a key that maps to nothing in this model, and when no LoRA weight is present.
    """
    index = build_index(root, config, file_prefix(list(tensors)))
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
        elif slot.target is not None:
            base.append((slot.target, tensor))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys match no module of this model, e.g. {unknown[:3]}; "
                         "expected PEFT keys such as 'base_model.model.<module path>.lora_A.weight' "
                         "(is this adapter for another base model?)")
    if not pairs:
        raise ValueError(f"{source}: no LoRA weights (lora_A/lora_B keys) found: expected at least one pair")
    refused = [name for name in tensors if index[name].kind == "base" and not _base_tensor_allowed(name, config,
                                                                                                   tensors)]
    if refused:
        raise ValueError(f"{source}: carries base-model tensors {refused[:3]} that its config does not account for "
                         f"(bias={config.bias!r}, targets {config.target_modules!r}): loading them would overwrite "
                         "the base model; expected biases only with bias='all'/'lora_only' and embedding weights "
                         "only for a targeted embedding layer")
    return pairs, saved, base


def _base_tensor_allowed(name: str, config: LoraConfig, tensors: dict[str, Tensor]) -> bool:
    """Whether a file may write base tensor `name`: a bias when its config trains biases, a full
    embedding weight (PEFT's save_embedding_layers) when the file also holds LoRA for that layer."""
    if name.rsplit(".", 1)[-1] == "bias":
        return config.bias != "none"
    layer = name.removesuffix(".weight").removesuffix(".base_layer")
    return any(key.startswith(layer + ".lora_") for key in tensors)


def remember_base(tuner: LoraTuner, adapter_name: str, changed: list[tuple[Tensor, Tensor]]) -> None:
    """Keep the base tensors a file is about to overwrite, so delete_adapter and unload() put them back."""
    backups = tuner.base_backups.setdefault(adapter_name, [])
    known = {id(target) for target, _ in backups}
    backups += [(target, target.detach().clone()) for target, _ in changed if id(target) not in known]


def checked_pair(path: str, layer: LoraLayer, parts: dict[str, Tensor], r: int, source: str
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


def check_saved(path: str, module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    original = module.original_module if isinstance(module, ModulesToSave) else module
    own = original.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: modules_to_save {path!r} lacks {missing}: expected its full state")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"{source}: {path}.{name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(own[name].shape)}")


def check_base(base: list[tuple[Tensor, Tensor]], source: str) -> list[tuple[Tensor, Tensor]]:
    """Base-model tensors the file carries, shape-checked; only those that differ need copying."""
    changed = []
    for target, value in base:
        if target.shape != value.shape:
            raise ValueError(f"{source}: a base-model tensor has shape {tuple(value.shape)}, expected "
                             f"{tuple(target.shape)} (resize the base model's embeddings first?)")
        if not torch.equal(target.detach(), value.to(target.device, target.dtype)):
            changed.append((target, value))
    return changed


def copy_base(changed: list[tuple[Tensor, Tensor]], source: str) -> None:
    if changed:
        warnings.warn(f"{source}: copied {len(changed)} base-model tensors (biases or embedding weights) that "
                      "differ from the model's into the base model, as PEFT does; they stay after "
                      "delete_adapter and are shared by every adapter", stacklevel=4)
    with torch.no_grad():
        for target, value in changed:
            target.copy_(value)


def check_token_rows(tuner: LoraTuner, adapter_name: str, config: LoraConfig, source: str) -> None:
    """Rows from a file go into an existing adapter only where it has rows for the same token ids."""
    own = {path: wrapper.token_adapter.token_indices[adapter_name] for path, wrapper in token_wrappers(tuner.model)
           if wrapper.token_adapter.tied_adapter is None and adapter_name in wrapper.token_adapter.token_indices}
    wanted = {target.path: target.indices for target in own_token_targets(tuner.model, config)}
    if own != wanted:
        raise ValueError(f"{source}: trainable_token_indices {wanted} do not match adapter {adapter_name!r}'s "
                         f"{own}: expected the same token ids on the same modules")


def check_tensors(tensors: dict[str, Any], source: str) -> None:
    """Every value a plain floating-point tensor with data: what A, B and saved modules can take.

    A legacy .bin read with weights_only can still hold meta, sparse or quantized
    tensors, and integer or bool ones would be cast silently; all are refused here,
    before anything changes.
    """
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{source}: key {name!r} is not a string: expected PEFT's tensor names")
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{source}: {name} is a {type(tensor).__name__}: expected a tensor")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise ValueError(f"{source}: {name} is a {tensor.layout} {tensor.dtype} tensor on {tensor.device}: "
                             "expected a dense tensor with data")
        if not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 2:
            raise ValueError(f"{source}: {name} has dtype {tensor.dtype}: expected float32, float16, bfloat16 "
                             "or float64")


def read_checked(tuner: LoraTuner, model_id_or_path: str, **kwargs: Any) -> tuple[LoraConfig, dict[str, Tensor], str]:
    config, tensors, source = read_adapter(model_id_or_path, _weights_device(tuner.model), **hub_kwargs(kwargs))
    check_tensors(tensors, source)
    return config, remap_keys(tensors, kwargs.get("key_mapping"), source), source


def remap_keys(tensors: dict[str, Tensor], key_mapping: dict[str, str] | None, source: str) -> dict[str, Tensor]:
    """PEFT's key_mapping: on each key less its `base_model.model.` prefix, the first regex that matches rewrites it."""
    if not key_mapping:
        return tensors
    remapped = {}
    for name, tensor in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{source}: key {name!r} has no 'base_model.model.' prefix: key_mapping expects "
                             "PEFT's keys")
        body = name.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            body, count = re.subn(pattern, replacement, body)
            if count:
                break
        remapped[prefix + body] = tensor
    return remapped


def load_adapter(tuner: LoraTuner, model_id_or_path: str, adapter_name: str, is_trainable: bool = False,
                 low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True,
                 config: LoraConfig | None = None, **kwargs: Any) -> LoadResult:
    """Read an adapter and add it to `tuner` as `adapter_name` (LoraModel.load_adapter).

    Order: read and check the config and every tensor; map every key to a module;
    plan the LoRA layers; check shapes, ranks and MergedLinear structure; only then
    mutate (new factors left uninitialised, or on the meta device, then filled).
    `config` (PEFT's keyword) replaces the file's adapter_config.json.
    """
    tuner.check_new_adapter(adapter_name)
    file_config, tensors, source = read_checked(tuner, model_id_or_path, **kwargs)
    if config is not None and not isinstance(config, LoraConfig):
        raise ValueError(f"config {config!r} is invalid: expected a LoraConfig")
    config_given = config
    config = dataclasses.replace(config or file_config, inference_mode=not is_trainable)
    root = tuner.model
    token_rows = take_token_rows(root, config, tensors, source)
    pairs, saved, base = place(root, config, tensors, source)
    layers = plan_layers(root, tuner.adapter_state, config, list(pairs))
    keyed = [(layer.config_key(path), layer) for path, _, layer in layers]  # a parameter's key names it
    weights = {path: checked_pair(path, layer, pairs[path], config.rank_for(layer.pattern_key(path)), source)
               for path, layer in keyed}
    extras = {path: checked_extras(path, layer, pairs[path], config, source) for path, layer in keyed}
    expected_saved = find_modules_to_save(root, config)
    for path in expected_saved:
        check_saved(path, root.get_submodule(path), saved.get(path, {}), source)
    tokens = plan_tokens(root, config, list(pairs), expected_saved)
    changed = check_base(base, source)
    if config_given is None:
        check_config_matches(file_config, source)  # last: the more specific errors above come first

    with tuner.adapter_state.lock:
        tuner.check_new_adapter(adapter_name)
        plan = Plan(adapter_name, config, layers, expected_saved, tokens)
        # PiSSA/OLoRA adapters apply to the residual base: their init runs again to subtract it, as in PEFT.
        init = config.init_lora_weights if mutates_base(config.init_lora_weights) else None
        tuner.install(plan, init=init, autocast_adapter_dtype=autocast_adapter_dtype,
                      low_cpu_mem_usage=low_cpu_mem_usage)
        for path, layer in keyed:
            layer.set_factors(adapter_name, *weights[path], in_place=False)
            set_extras(layer, adapter_name, extras[path], in_place=False)
        for path in expected_saved:
            # .get: a module with no state (e.g. an activation) has no keys in the file
            saved_module = root.get_submodule(path)
            assert isinstance(saved_module, ModulesToSave)
            saved_module.modules_to_save[adapter_name].load_state_dict(saved.get(path, {}), strict=False,
                                                                       assign=low_cpu_mem_usage)
        set_token_rows(root, adapter_name, token_rows)
        remember_base(tuner, adapter_name, changed)
        copy_base(changed, source)
    return LoadResult(missing_keys=[], unexpected_keys=[])


def hotswap_adapter(tuner: LoraTuner, model_id_or_path: str, adapter_name: str, **kwargs: Any) -> None:
    """Copy an adapter's weights into the existing adapter `adapter_name`, in place.

    The file must cover exactly the same modules with the same ranks; the
    scaling and config follow the new file. No module or parameter is
    replaced, so compiled or captured models keep working.
    """
    tuner.check_adapter(adapter_name)
    if adapter_name in tuner.merged_adapters():
        raise ValueError(f"adapter {adapter_name!r} is merged: unmerge_adapter() before hotswapping it")
    old = tuner.peft_config[adapter_name]
    config, tensors, source = read_checked(tuner, model_id_or_path, **kwargs)
    config = dataclasses.replace(config, inference_mode=old.inference_mode)
    token_rows = take_token_rows(tuner.model, config, tensors, source)
    check_token_rows(tuner, adapter_name, config, source)
    pairs, saved, base = place(tuner.model, config, tensors, source)
    layers: dict[str, LoraLayer] = {}
    copies: dict[str, ModulesToSave] = {}
    for path, module in walk(tuner.model):
        if isinstance(module, LoraLayer) and adapter_name in module.adapters:
            layers[module.config_key(path)] = module
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            copies[path] = module
    if set(pairs) != set(layers) or set(saved) != set(copies):
        differ = sorted(set(pairs) ^ set(layers) | set(saved) ^ set(copies))
        raise ValueError(f"{source}: adapter covers other modules than {adapter_name!r} ({differ[:3]}...): "
                         "hotswap needs the same target modules and modules_to_save")
    for field in ("use_dora", "lora_bias"):
        if getattr(config, field) != getattr(old, field):
            raise ValueError(f"{source}: {field}={getattr(config, field)!r} but adapter {adapter_name!r} has "
                             f"{field}={getattr(old, field)!r}: hotswap needs the same variant")
    weights, extras = {}, {}
    for path, layer in layers.items():
        extras[path] = checked_extras(path, layer, pairs[path], config, source)
        if getattr(layer, "enable_lora", None) != config.enable_lora:
            raise ValueError(f"{source}: enable_lora={config.enable_lora!r} but {path!r} has "
                             f"enable_lora={getattr(layer, 'enable_lora', None)!r}")
        rank = config.rank_for(layer.pattern_key(path))
        weights[path] = checked_pair(path, layer, pairs[path], rank, source)
        if rank != layer.adapters[adapter_name].r:
            raise ValueError(f"{source}: {path!r} has rank {rank} in the file, expected "
                             f"{layer.adapters[adapter_name].r} (hotswap needs the same ranks)")
    for path, module in copies.items():
        check_saved(path, module, saved[path], source)
    changed = check_base(base, source)
    check_config_matches(config, source)

    with tuner.adapter_state.lock:
        for path, layer in layers.items():
            layer.set_factors(adapter_name, *weights[path], in_place=True)
            set_extras(layer, adapter_name, extras[path], in_place=True)
            record = layer.adapters[adapter_name]
            key = layer.pattern_key(path)
            record.scaling, record.lora_alpha = config.scaling_for(key), config.alpha_for(key)
            dropout = layer.lora_dropout[adapter_name]
            if isinstance(dropout, nn.Dropout):
                dropout.p = config.lora_dropout
        for path, module in copies.items():
            module.modules_to_save[adapter_name].load_state_dict(saved[path], strict=False)
        set_token_rows(tuner.model, adapter_name, token_rows)
        remember_base(tuner, adapter_name, changed)
        copy_base(changed, source)
        tuner.peft_config[adapter_name] = config
