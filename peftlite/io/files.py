"""Adapter directories in PEFT's format: the config translation, safe reading, saving.

A directory holds `adapter_config.json` (PEFT's field names, `"peft_type":
"LORA"`, plus peftlite's own `merge_weights`/`enable_lora`, which PEFT
ignores with a warning), `adapter_model.safetensors` under PEFT's keys
(keys.py) and a README.md model card (card.py). Reading never unpickles:
safetensors first, a legacy `adapter_model.bin` only through
`torch.load(weights_only=True)`. A whole save, every adapter at once, is
atomic (atomic.py's journal; a read finishes a committed save that was
interrupted), and the weights' safetensors metadata holds a hash of the
config's scaling fields so a load notices a config from another save.
Putting what was read into a model is loading.py's job.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import CONFIG_NAME, LoraConfig, read_json
from ..storage import hub
from ..storage.atomic import (
    atomic_write_tree,
    finish_interrupted,
    prepare_directory,
    text_writer,
    write_safetensors,
)
from .card import model_card
from .conversion import converted_config, converted_tensors
from .keys import adapter_tensors
from .legacy import from_legacy_fused

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
CONFIG_HASH_KEY = "peftlite_config_sha256"  # safetensors metadata: which config these weights were saved with
# What turns the same tensors into other outputs without any key or shape check noticing: the scaling.
HASHED_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


# ---- config <-> file -----------------------------------------------------------------------------
def read_config(model_id_or_path: str, **hub_kwargs: Any) -> LoraConfig:
    return LoraConfig.from_pretrained(model_id_or_path, **hub_kwargs)


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
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{path}: expected a dict of tensors under string keys (PEFT's tensor names)")
    return tensors, path


def read_adapter(model_id_or_path: str, device: str | torch.device = "cpu",
                 **hub_kwargs: Any) -> tuple[LoraConfig, dict[str, Tensor], str]:
    """(config, tensors under PEFT's keys on `device`, weights path) of one saved adapter.

    A local directory whose save was interrupted after its commit is finished first (atomic.py).
    """
    local = os.path.join(model_id_or_path, hub_kwargs.get("subfolder") or "")
    if os.path.isdir(local):
        finish_interrupted(os.path.dirname(os.path.abspath(local)))  # "default" beside "other"
        finish_interrupted(local)
    config_path = hub.resolve(model_id_or_path, CONFIG_NAME, **hub_kwargs)
    tensors, path = read_weights(model_id_or_path, device, **hub_kwargs)
    raw, tensors = from_legacy_fused(read_json(config_path), tensors, path)  # PEFT 0.2/0.3, loralib files
    return LoraConfig.from_file_dict(raw, config_path), tensors, path


# ---- saving -------------------------------------------------------------------------------------
def save_adapters(root: nn.Module, configs: dict[str, LoraConfig], save_directory: str | os.PathLike,
                  selected_adapters: list[str] | None = None, is_main_process: bool = True,
                  safe_serialization: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                  **ignored: Any) -> None:
    """Write adapters of model `root` as PEFT does: "default" at the root, any other in a subfolder.

    path_initial_model_for_weight_conversion: the PiSSA/OLoRA adapter as saved right after
    initialisation; each adapter is then written as the equivalent plain LoRA on the
    original base (rank 2r, conversion.py), as PEFT does.

    Each directory gets adapter_config.json, adapter_model.safetensors and a README.md
    model card; every file is written atomically.
    """
    if isinstance(selected_adapters, str):
        selected_adapters = [selected_adapters]
    if selected_adapters is not None and not isinstance(selected_adapters, (list, tuple)):
        raise ValueError(f"selected_adapters={selected_adapters!r} is invalid: expected a list of adapter names")
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if not isinstance(name, str) or name not in configs]
    if unknown:
        raise ValueError(f"selected_adapters {unknown!r} not found: loaded adapters are {sorted(configs)}")
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: peftlite writes only safetensors")
    if ignored:
        warnings.warn(f"save_pretrained ignores {sorted(ignored)}", stacklevel=3)
    directory_root = prepare_directory(save_directory, create=is_main_process)
    if not is_main_process:
        return
    for name in names:
        if name != "default" and (directory_root / name).exists() and not (directory_root / name).is_dir():
            raise ValueError(f"{str(directory_root / name)!r} is a file: adapter {name!r} needs a subfolder of "
                             "that name")
    plan = []
    for name in names:
        directory = directory_root if name == "default" else directory_root / name
        directory.mkdir(exist_ok=True)
        config = dataclasses.replace(configs[name], inference_mode=True,
                                     base_model_name_or_path=configs[name].base_model_name_or_path
                                     or _base_model_name(root))
        tensors = adapter_tensors(root, config, name)
        if path_initial_model_for_weight_conversion is not None:
            initial, source = read_weights(str(path_initial_model_for_weight_conversion))
            config = converted_config(config)
            tensors = converted_tensors(tensors, initial, source)
        metadata = {"format": "pt", CONFIG_HASH_KEY: config_hash(config)}
        writers: dict[str, Callable[[str], None]] = {
            WEIGHTS_NAME: functools.partial(write_safetensors, tensors, metadata=metadata),
            CONFIG_NAME: text_writer(config.to_json_file_text())}
        # the card names the model's own Hub name, as PEFT's does, not the config's
        card = model_card(directory / CARD_NAME, _base_model_name(root), root, config.task_type)
        if card is not None:
            writers[CARD_NAME] = text_writer(card)
        plan.append((directory, writers))
    atomic_write_tree(directory_root, plan)  # every adapter's files change together


def config_hash(config: LoraConfig) -> str:
    """A hash of the config fields that set each layer's scaling (HASHED_FIELDS).

    Stored in the weights file's safetensors metadata (PEFT ignores it), so a load
    can tell a config from another save (a copied file, a save torn by another tool):
    with the same r and target modules nothing else would notice a lora_alpha of 8
    beside weights saved with 32. Other edits (modules_to_save, task_type) stay free.
    """
    data = {k: v for k, v in config.to_file_dict().items() if k in HASHED_FIELDS}
    return hashlib.sha256(json.dumps(_numbers_as_floats(data), sort_keys=True).encode()).hexdigest()


def _numbers_as_floats(value: Any) -> Any:
    """16 and 16.0 alike: a config read back may hold a float where the saved one held an int."""
    if isinstance(value, dict):
        return {str(k): _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def check_config_matches(config: LoraConfig, path: str) -> None:
    """ValueError when weights saved by peftlite name another config than the one beside them."""
    if not path.endswith(WEIGHTS_NAME):
        return
    try:
        with safe_open(path, framework="pt") as f:
            saved = (f.metadata() or {}).get(CONFIG_HASH_KEY)
    except (SafetensorError, OSError):
        return  # read_weights names the bad file
    if saved is not None and saved != config_hash(config):
        raise ValueError(f"{path}: these weights were saved with another {CONFIG_NAME} than the one beside "
                         "them (r, lora_alpha, use_rslora, rank_pattern or alpha_pattern differ: a file copied "
                         "from another save, or an edit); expected the pair written by one save_pretrained, or "
                         "pass config=LoraConfig(...) to load_adapter to choose the scaling yourself")


def _base_model_name(model) -> str | None:
    """The name the base model was loaded under (transformers' `name_or_path`), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


