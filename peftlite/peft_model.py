"""LoraModel (= PeftModel): what `get_lora_model` / `get_peft_model` return, with PEFT's object tree.

`lora.base_model` is the LoRA tuner (PEFT's `LoraModel`, here `LoraTuner`) and
`lora.base_model.model` the user's model, modified in place; parameter and
state_dict names are PEFT's (`base_model.model.<path>.lora_A.default.weight`).
This class adds what needs files and the Hub (save, load, push) on top of the
tuner; every other PEFT name delegates to it. Attributes it does not define
are read from the tuner and then the user's model (`lora.prefix`, `lora.config`,
`lora.device`, ...), as PEFT reads them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .io.files import save_adapters
from .io.loading import LoadResult, hotswap_adapter, load_adapter
from .io.state_dict import attach_tuner, attached_tuner
from .layers import LoraLayer, ModulesToSave
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .storage import hub
from .tuner import LoraTuner

HUB_ARGUMENTS = ("revision", "subfolder", "token", "cache_dir", "local_files_only")


class LoraModel(nn.Module):
    """A model with LoRA adapters, PEFT's `PeftModel` in shape and names."""

    # transformers' Trainer trains a quantized model only if this says it carries adapters (QLoRA)
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoraConfig | None, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """Wrap `model` with adapter `adapter_name` made from `config` (None: no adapter yet, for loading)."""
        super().__init__()
        self.base_model = LoraTuner(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                    autocast_adapter_dtype=autocast_adapter_dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # as PEFT: the tuner (prefix, ...), which forwards to the model

    # ---- PEFT's names, read from the tuner -------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str] | None:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.base_model.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside disable_adapter() or after disable_adapter_layers(), as PEFT's property of that name."""
        return not self.base_model.adapter_state.disabled and bool(self.base_model.active_adapters)

    @property
    def peft_type(self) -> str:
        return "LORA"

    @property
    def adapter_state(self) -> Any:
        return self.base_model.adapter_state

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for config in self.peft_config.values() for m in (config.modules_to_save or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model.model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def use_fast_path(self, enabled: bool = True) -> None:
        """Turn the fused training path on or off for this model (off: every layer runs the reference forward)."""
        self.base_model.adapter_state.fast = bool(enabled)

    # ---- running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; `adapter_names` (one per sample, "__base__" = none) mixes adapters in a batch."""
        return self.base_model(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, adapter_names=adapter_names, **kwargs)

    # ---- the adapter set ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                                    autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merged_adapters(self) -> list[str]:
        return self.base_model.merged_adapters()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", svd_rank: int | None = None, **kwargs: Any) -> None:
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank, **kwargs)

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    @property
    def targeted_module_names(self) -> list[str]:
        return self.base_model.targeted_module_names

    # ---- files and the Hub -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """Write adapters in PEFT's format: "default" at the root, any other in a subfolder of its name.

        path_initial_model_for_weight_conversion: a PiSSA/OLoRA adapter saved right after
        initialisation; the adapters are then written as plain LoRA (rank 2r) on the original base.
        """
        if self.base_model.unloaded:
            raise ValueError("this LoraModel was unloaded (merge_and_unload/unload): its adapters are gone from "
                             "the model, so saving would write an empty adapter; save before unloading")
        if save_embedding_layers not in (False, "auto"):
            raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is not supported: expected False or "
                             "'auto'; peftlite does not write base embedding tables into an adapter (save a resized "
                             "base model with its own save_pretrained)")
        save_adapters(self.base_model.model, self.peft_config, save_directory, selected_adapters,
                      is_main_process=is_main_process, safe_serialization=safe_serialization,
                      path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        revision: str | None = None, subfolder: str | None = None, token: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False,
                        **kwargs: Any) -> "LoraModel":
        """Wrap `model` with an adapter read from a directory or a Hub repo, and make it active.

        As PEFT: in eval mode unless is_trainable. A failed load raises before any module of `model` changes.
        """
        lora_model = cls(model, None)
        lora_model.load_adapter(model_id_or_path, adapter_name, is_trainable=is_trainable, config=config,
                                autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
                                revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only, key_mapping=key_mapping, **kwargs)
        lora_model.set_adapter(adapter_name)
        if not is_trainable:
            lora_model.eval()
        return lora_model

    def load_adapter(self, model_id_or_path: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     **kwargs: Any) -> LoadResult:
        """Read an adapter (PEFT's format) and add it under `adapter_name`, not active.

        Everything is validated before the first module changes, so on any error
        the model is left exactly as it was. Returns PEFT's (missing_keys, unexpected_keys).
        As PEFT: unless is_trainable, the whole model is put in eval mode (dropout off).
        """
        result = load_adapter(self.base_model, model_id_or_path, adapter_name, is_trainable,
                              low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype,
                              **kwargs)
        if not is_trainable and self.training:  # already in eval: a walk over the model would change nothing
            self.eval()
        return result

    def hotswap_adapter(self, model_id_or_path: str, adapter_name: str, **kwargs: Any) -> None:
        """Load new weights into the existing adapter `adapter_name` in place (same modules and ranks)."""
        hotswap_adapter(self.base_model, model_id_or_path, adapter_name, **kwargs)

    def push_to_hub(self, repo_id: str, adapter_name: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None, revision: str | None = None,
                    **kwargs: Any) -> Any:
        """Save and upload adapters: all as save_pretrained lays them out, or one named adapter at the root."""
        if adapter_name is not None:
            self.base_model.check_adapter(adapter_name)
        with tempfile.TemporaryDirectory(prefix="peftlite-push-") as tmp:
            self.save_pretrained(tmp, selected_adapters=None if adapter_name is None else [adapter_name])
            folder = Path(tmp) if adapter_name in (None, "default") else Path(tmp) / adapter_name
            return hub.push_directory(folder, repo_id, private=private, token=token,
                                      commit_message=commit_message, revision=revision)

    # ---- counting and status -----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as PEFT counts them."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """PEFT's per-layer status (peftlite.status)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's model-wide status summary (peftlite.status)."""
        return get_model_status(self)

    def lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return self.base_model.lora_layers()

    def saved_modules(self) -> list[tuple[str, ModulesToSave]]:
        return self.base_model.saved_modules()


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> LoraModel:
    """Wrap `model` (modified in place) with a new, active LoRA adapter; PEFT's get_peft_model."""
    if not isinstance(config, LoraConfig):  # LoraModel takes None (an empty wrapper for loading); this does not
        raise ValueError(f"config {config!r} is invalid: expected a peftlite LoraConfig")
    if mixed:
        raise ValueError("mixed=True (PEFT's PeftMixedModel) is not supported: peftlite is LoRA only")
    if revision is not None:
        config.revision = revision
    return LoraModel(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None
                            ) -> nn.Module:
    """Put LoRA layers into `model` and return it, without a LoraModel around it (PEFT's low-level API).

    On a model this function already injected into, the adapter is added beside the
    others and made the active one, as in PEFT.
    """
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config {peft_config!r} is invalid: expected a peftlite LoraConfig")
    tuner = attached_tuner(model)
    if tuner is not None:
        tuner.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        tuner.set_adapter(adapter_name)
        return model
    tuner = LoraTuner(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    attach_tuner(tuner.model, tuner)
    return tuner.model
