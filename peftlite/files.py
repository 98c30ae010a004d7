"""Adapter directories in PEFT's format: write, read, load into a model, hotswap.

A directory holds `adapter_config.json` (PEFT's field names, `"peft_type":
"LORA"`, plus peftlite's own `merge_weights`/`enable_lora`, which PEFT
ignores with a warning), `adapter_model.safetensors` under PEFT's keys
(peft_keys.py) and a README.md model card. Safety rules:

- reading never unpickles: safetensors first, a legacy `adapter_model.bin`
  only through `torch.load(weights_only=True)`;
- every write goes to a temporary file in the target directory and is then
  renamed over the old one, so a crash leaves old or new files, never half
  of one; all of a directory's files are staged before the first rename;
- loading validates the config, every key, shape and rank against the model
  before the first module changes, so a failed load changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import hub
from .config import CONFIG_NAME, LoraConfig
from .layers import LoraLayer, MergedLinear, ModulesToSave
from .peft_keys import (Slot, adapter_tensors, build_index, file_prefix, file_shapes, fused_from_file,
                        saved_paths, walk)

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"

# PEFT fields that change the math unless they hold one of these values: such adapters are refused.
MATH_CHANGING: dict[str, tuple] = {
    "use_dora": (False, None), "lora_bias": (False, None), "use_qalora": (False, None),
    "use_bdlora": (None, False), "layer_replication": (None,), "target_parameters": (None, []),
    "trainable_token_indices": (None,), "alora_invocation_tokens": (None,), "arrow_config": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "megatron_config": (None,),
}
# PEFT fields with no effect on an adapter once trained (bookkeeping, init or backward-only options).
NO_EFFECT = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying",
             "layers_pattern", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
             "velora_config", "runtime_config"}
# init_lora_weights values that only choose a starting point: a loaded adapter reads as init True.
INIT_ONLY = ("eva", "orthogonal")


# ---- config <-> file -----------------------------------------------------------------------------
def _fused_factors(config_enable_lora: list[bool] | None, use_rslora: bool) -> tuple[int, float]:
    """(rank factor, alpha factor) turning a MergedLinear config into PEFT's equivalent plain LoRA.

    PEFT sees rank groups·r; keeping s fixed needs alpha·groups (alpha·sqrt(groups) with rsLoRA).
    """
    groups = sum(config_enable_lora) if config_enable_lora else 1
    return groups, (math.sqrt(groups) if use_rslora else groups)


def config_to_file(config: LoraConfig) -> dict[str, Any]:
    """The JSON object of adapter_config.json: PEFT's view, plus our extra fields."""
    data = config.to_dict()
    rank_factor, alpha_factor = _fused_factors(config.enable_lora, config.use_rslora)
    if rank_factor > 1:
        data["r"] = config.r * rank_factor
        data["lora_alpha"] = config.lora_alpha * alpha_factor
        data["rank_pattern"] = {k: v * rank_factor for k, v in config.rank_pattern.items()}
        data["alpha_pattern"] = {k: v * alpha_factor for k, v in config.alpha_pattern.items()}
    return data


def config_from_file(data: Any, source: str) -> LoraConfig:
    """LoraConfig from a PEFT or peftlite adapter_config.json object.

    Raises ValueError for settings that change the math (DoRA, another
    peft_type, ...); unknown keys are dropped with one warning.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    peft_type = data.pop("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{source}: peft_type={peft_type!r} is not supported: peftlite loads only 'LORA' adapters")
    for name, allowed in MATH_CHANGING.items():
        if name in data and not any(data[name] == value for value in allowed):
            raise ValueError(f"{source}: {name}={data[name]!r} is not supported by peftlite "
                             f"(it changes the LoRA math); expected {allowed[0]!r}")
    init = data.get("init_lora_weights", True)
    if init in INIT_ONLY:
        data["init_lora_weights"] = True
    elif not (isinstance(init, bool) or init == "gaussian"):
        raise ValueError(f"{source}: init_lora_weights={init!r} is not supported: this adapter expects a base "
                         "model modified by its init (PiSSA, OLoRA, CorDA, LoftQ, ...); convert it to plain "
                         "LoRA with PEFT first (save_pretrained(path_initial_model_for_weight_conversion=...))")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in data if k not in fields and k not in NO_EFFECT and k not in MATH_CHANGING)
    if unknown:
        warnings.warn(f"{source}: ignoring config keys peftlite does not know: {unknown}", stacklevel=3)
    kwargs = {k: v for k, v in data.items() if k in fields}
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    rank_factor, alpha_factor = _fused_factors(config.enable_lora, config.use_rslora)
    if rank_factor > 1:
        ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items()}}
        bad = {k: v for k, v in ranks.items() if v % rank_factor}
        if bad:
            raise ValueError(f"{source}: {bad} not divisible by the {rank_factor} enabled slices of "
                             f"enable_lora={config.enable_lora}: expected PEFT's rank groups·r")
        config = dataclasses.replace(
            config, r=config.r // rank_factor, lora_alpha=config.lora_alpha / alpha_factor,
            rank_pattern={k: v // rank_factor for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v / alpha_factor for k, v in config.alpha_pattern.items()})
    return config


def write_config(config: LoraConfig, save_directory: str | os.PathLike) -> None:
    """Write adapter_config.json into `save_directory` atomically (LoraConfig.save_pretrained)."""
    directory = _prepare_directory(save_directory)
    atomic_write_all(directory, {CONFIG_NAME: _text_writer(_config_json(config))})


def read_config(model_id_or_path: str, **hub_kwargs: Any) -> LoraConfig:
    """adapter_config.json from a directory or a Hub repo (LoraConfig.from_pretrained)."""
    path = hub.resolve(model_id_or_path, CONFIG_NAME, **hub_kwargs)
    return config_from_file(_read_json(path), path)


def _config_json(config: LoraConfig) -> str:
    return json.dumps(config_to_file(config), indent=2, sort_keys=True) + "\n"


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: absurd nesting
        raise ValueError(f"{path}: not valid JSON ({err}); expected a PEFT adapter_config.json") from None


# ---- weights ------------------------------------------------------------------------------------
def read_weights(model_id_or_path: str, **hub_kwargs: Any) -> tuple[dict[str, Tensor], str]:
    """(tensors, file path): safetensors if present, else a legacy .bin read with weights_only=True."""
    try:
        path = hub.resolve(model_id_or_path, WEIGHTS_NAME, **hub_kwargs)
    except FileNotFoundError as missing:
        try:
            path = hub.resolve(model_id_or_path, LEGACY_WEIGHTS_NAME, **hub_kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{missing} (and no legacy {LEGACY_WEIGHTS_NAME} either)") from None
    else:
        try:
            return load_file(path), path
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err}); expected PEFT's "
                             f"{WEIGHTS_NAME}") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise ValueError(f"{path}: not a readable weights-only torch file ({err})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return tensors, path


def read_adapter(model_id_or_path: str, **hub_kwargs: Any) -> tuple[LoraConfig, dict[str, Tensor], str]:
    """(config, tensors under PEFT's keys, weights path) of one saved adapter."""
    config = read_config(model_id_or_path, **hub_kwargs)
    tensors, path = read_weights(model_id_or_path, **hub_kwargs)
    return config, tensors, path


# ---- loading into a model -----------------------------------------------------------------------
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


def _check_pair(path: str, layer: LoraLayer, parts: dict[str, Tensor], r: int, source: str) -> None:
    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        raise ValueError(f"{source}: module {path!r} has no lora_{missing[0]} weight: expected both A and B")
    for part, expected in zip(("A", "B"), file_shapes(layer, r)):
        if tuple(parts[part].shape) != expected:
            raise ValueError(f"{source}: lora_{part} of {path!r} has shape {tuple(parts[part].shape)}, expected "
                             f"{expected} (r={r} from the config, layer {type(layer).__name__})")


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


def _copy_pair(layer: LoraLayer, name: str, parts: dict[str, Tensor], source: str, adopt: bool = False) -> None:
    """Put a file's A and B into adapter `name` of `layer`.

    adopt=True (a new adapter) takes over the freshly read tensors' storage
    when dtype and device already match, instead of copying ~all the bytes a
    second time; hotswap (adopt=False) copies in place so the Parameter and
    its storage stay the ones a compiled graph captured.
    """
    record = layer.adapters[name]
    lora_B = parts["B"]
    if isinstance(layer, MergedLinear):
        lora_B = fused_from_file(layer, lora_B, source)
    with torch.no_grad():
        for param, value in ((record.lora_A, parts["A"]), (record.lora_B, lora_B)):
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
    config, tensors, source = read_adapter(model_id_or_path, **hub_kwargs)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    root = lora_model.base_model
    pairs, saved, base = _place(lora_model, config, tensors, source)
    layers = lora_model.plan_layers(config, [(path, root.get_submodule(path)) for path in pairs])
    for path, _, layer in layers:
        _check_pair(path, layer, pairs[path], config.rank_for(path), source)
        if isinstance(layer, MergedLinear):
            fused_from_file(layer, pairs[path]["B"], f"{source}: lora_B of {path!r}")
    expected_saved = saved_paths(root, config)
    for path in expected_saved:
        _check_saved(path, root.get_submodule(path), saved.get(path, {}), source)
    changed = _check_base(base, source)

    lora_model.install_adapter(adapter_name, config, layers, expected_saved, init=None)
    for path, _, layer in layers:
        _copy_pair(layer, adapter_name, pairs[path], source, adopt=True)
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
    config, tensors, source = read_adapter(model_id_or_path, **hub_kwargs)
    config = dataclasses.replace(config, inference_mode=old.inference_mode)
    pairs, saved, base = _place(lora_model, config, tensors, source)
    layers = {path: m for path, m in walk(lora_model.base_model)
              if isinstance(m, LoraLayer) and adapter_name in m.adapters}
    copies = {path: m for path, m in walk(lora_model.base_model)
              if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save}
    if set(pairs) != set(layers) or set(saved) != set(copies):
        differ = sorted(set(pairs) ^ set(layers) | set(saved) ^ set(copies))
        raise ValueError(f"{source}: adapter covers other modules than {adapter_name!r} ({differ[:3]}...): "
                         "hotswap needs the same target modules and modules_to_save")
    for path, layer in layers.items():
        if getattr(layer, "enable_lora", None) != config.enable_lora:
            raise ValueError(f"{source}: enable_lora={config.enable_lora!r} but {path!r} has "
                             f"enable_lora={getattr(layer, 'enable_lora', None)!r}")
        record = layer.adapters[adapter_name]
        _check_pair(path, layer, pairs[path], record.r, source)
        if (record.dropout is None) != (config.lora_dropout == 0):
            raise ValueError(f"{source}: lora_dropout={config.lora_dropout} cannot replace "
                             f"{0 if record.dropout is None else record.dropout.p} in place")
        if isinstance(layer, MergedLinear):
            fused_from_file(layer, pairs[path]["B"], f"{source}: lora_B of {path!r}")
    for path, module in copies.items():
        _check_saved(path, module, saved[path], source)
    changed = _check_base(base, source)

    for path, layer in layers.items():
        _copy_pair(layer, adapter_name, pairs[path], source)
        record = layer.adapters[adapter_name]
        record.scaling = config.scaling_for(path)
        if record.dropout is not None:
            record.dropout.p = config.lora_dropout
    for path, module in copies.items():
        module.modules_to_save[adapter_name].load_state_dict(saved[path], strict=False)
    _copy_base(changed, source)
    lora_model.peft_config[adapter_name] = config


# ---- saving -------------------------------------------------------------------------------------
def save_adapters(lora_model, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                  is_main_process: bool = True, safe_serialization: bool = True, **ignored: Any) -> None:
    """Write adapters as PEFT does: "default" at the root, any other in a subfolder of its name.

    Each directory gets adapter_config.json, adapter_model.safetensors and a
    README.md model card; every file is written atomically.
    """
    if isinstance(selected_adapters, str):
        selected_adapters = [selected_adapters]
    if selected_adapters is not None and not isinstance(selected_adapters, (list, tuple)):
        raise ValueError(f"selected_adapters={selected_adapters!r} is invalid: expected a list of adapter names")
    names = list(lora_model.peft_config) if selected_adapters is None else list(selected_adapters)
    for name in names:
        lora_model.check_adapter(name)
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: peftlite writes only safetensors")
    if ignored:
        warnings.warn(f"save_pretrained ignores {sorted(ignored)}", stacklevel=3)
    root = _prepare_directory(save_directory, create=is_main_process)
    if not is_main_process:
        return
    for name in names:
        directory = root if name == "default" else root / name
        directory.mkdir(exist_ok=True)
        config = lora_model.peft_config[name]
        config = dataclasses.replace(config, inference_mode=True,
                                     base_model_name_or_path=config.base_model_name_or_path
                                     or _base_model_name(lora_model.base_model))
        tensors = adapter_tensors(lora_model, name)
        card = model_card(directory / CARD_NAME, config.base_model_name_or_path)
        atomic_write_all(directory, {
            WEIGHTS_NAME: lambda path, t=tensors: save_file(t, path, metadata={"format": "pt"}),
            CONFIG_NAME: _text_writer(_config_json(config)),
            CARD_NAME: _text_writer(card),
        })


def _base_model_name(model) -> str | None:
    """The name the base model was loaded under (transformers' `name_or_path`), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def model_card(existing: Path, base_model: str | None) -> str:
    """README.md with `library_name: peft` (so the Hub lists an adapter) and `base_model` front matter.

    An existing card keeps its text; only its metadata is updated.
    """
    from huggingface_hub import ModelCard, ModelCardData
    if existing.is_file():
        card = ModelCard(existing.read_text(encoding="utf-8"))
    else:
        card = ModelCard("---\nlibrary_name: peft\n---\n\n# LoRA adapter\n\nA LoRA adapter in PEFT's format, "
                         "saved by peftlite. Load it with `peftlite.LoraModel.from_pretrained(model, path)` "
                         "or `peft.PeftModel.from_pretrained(model, path)`.\n")
    data: ModelCardData = card.data
    data.library_name = "peft"
    if base_model:
        data.base_model = base_model
    tags = list(data.tags or [])
    for tag in (["base_model:adapter:" + base_model] if base_model else []) + ["lora", "peftlite"]:
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    return str(card)


# ---- atomic writing -----------------------------------------------------------------------------
def _prepare_directory(save_directory: str | os.PathLike, create: bool = True) -> Path:
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
        raise ValueError(f"save_directory={save_directory!r} is invalid: expected a directory path")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_directory {str(directory)!r} is a file: expected a directory")
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def atomic_write_all(directory: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write every file to a temporary file in `directory`, fsync, then rename each over its target.

    If any writer fails, every temporary file is removed and no target has
    changed. The renames come last, one after another, each atomic.
    """
    _remove_orphans(directory, list(writers))
    staged: dict[str, str] = {}
    try:
        for name, write in writers.items():
            # Not mkstemp: the writer creates the file, so it gets the usual permissions (umask).
            tmp = str(directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            staged[name] = tmp
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def _remove_orphans(directory: Path, names: list[str]) -> None:
    """Delete temporary files left by a save that was killed outright (SIGKILL, power loss).

    Only files named as `atomic_write_all` names them, for these targets, whose
    writing process no longer exists; a save still running elsewhere is left alone.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    for name in names:
        prefix = f".{name}."
        for entry in os.scandir(directory):
            pid = entry.name[len(prefix):].split(".", 1)[0]
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and pid.isdigit():
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)
                except OSError:  # alive but not ours (PermissionError): leave it
                    pass
