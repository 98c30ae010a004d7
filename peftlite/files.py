"""Adapter directories in PEFT's format: the config translation, safe reading, atomic writing.

A directory holds `adapter_config.json` (PEFT's field names, `"peft_type":
"LORA"`, plus peftlite's own `merge_weights`/`enable_lora`, which PEFT
ignores with a warning), `adapter_model.safetensors` under PEFT's keys
(peft_keys.py) and a README.md model card. Safety rules:

- reading never unpickles: safetensors first, a legacy `adapter_model.bin`
  only through `torch.load(weights_only=True)`;
- every write goes to a temporary file in the target directory and is then
  renamed over the old one, so a crash leaves old or new files, never half
  of one; all of a directory's files are staged before the first rename;
- putting what was read into a model is loading.py's job.
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
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from . import hub
from .config import CONFIG_NAME, LoraConfig
from .peft_keys import adapter_tensors

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
def read_weights(model_id_or_path: str, device: str | torch.device = "cpu",
                 **hub_kwargs: Any) -> tuple[dict[str, Tensor], str]:
    """(tensors on `device`, file path): safetensors if present, else a legacy .bin read with weights_only=True."""
    try:
        path = hub.resolve(model_id_or_path, WEIGHTS_NAME, **hub_kwargs)
    except FileNotFoundError as missing:
        try:
            path = hub.resolve(model_id_or_path, LEGACY_WEIGHTS_NAME, **hub_kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{missing} (and no legacy {LEGACY_WEIGHTS_NAME} either)") from None
    else:
        try:
            return load_file(path, device=str(device)), path
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err}); expected PEFT's "
                             f"{WEIGHTS_NAME}") from None
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise ValueError(f"{path}: not a readable weights-only torch file ({err})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return tensors, path


def read_adapter(model_id_or_path: str, device: str | torch.device = "cpu",
                 **hub_kwargs: Any) -> tuple[LoraConfig, dict[str, Tensor], str]:
    """(config, tensors under PEFT's keys on `device`, weights path) of one saved adapter."""
    config = read_config(model_id_or_path, **hub_kwargs)
    tensors, path = read_weights(model_id_or_path, device, **hub_kwargs)
    return config, tensors, path


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
        if name != "default" and (root / name).exists() and not (root / name).is_dir():
            raise ValueError(f"{str(root / name)!r} is a file: adapter {name!r} needs a subfolder of that name")
    for name in names:
        directory = root if name == "default" else root / name
        directory.mkdir(exist_ok=True)
        config = lora_model.peft_config[name]
        config = dataclasses.replace(config, inference_mode=True,
                                     base_model_name_or_path=config.base_model_name_or_path
                                     or _base_model_name(lora_model.base_model))
        tensors = adapter_tensors(lora_model, name)
        writers = {WEIGHTS_NAME: lambda path, t=tensors: write_safetensors(t, path, metadata={"format": "pt"}),
                   CONFIG_NAME: _text_writer(_config_json(config))}
        card = model_card(directory / CARD_NAME, config.base_model_name_or_path)
        if card is not None:
            writers[CARD_NAME] = _text_writer(card)
        atomic_write_all(directory, writers)


def _base_model_name(model) -> str | None:
    """The name the base model was loaded under (transformers' `name_or_path`), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def model_card(existing: Path, base_model: str | None) -> str | None:
    """README.md with `library_name: peft` (so the Hub lists an adapter) and `base_model` front matter.

    An existing card keeps its text; only its metadata is updated. One whose
    front matter is not valid YAML is left alone (None, with a warning)
    rather than overwritten.
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData
    if existing.is_file():
        try:
            card = ModelCard(existing.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
            warnings.warn(f"{existing}: front matter is not valid YAML ({err}); README.md left unchanged",
                          stacklevel=4)
            return None
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


def write_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file at `path` ourselves.

    Not `safetensors.torch.save_file`: it stages its own `.tmpXXXXXX` file
    beside the target, which a killed save would leave behind under a name
    `atomic_write_all` cannot recognise as its own.
    """
    data = safetensors_bytes(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


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
