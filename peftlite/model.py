"""LoraModel: finds the target modules, swaps in LoRA layers, and delegates.

The wrapper owns no math. It validates a request completely before touching
the model (so a failed call changes nothing), replaces modules in place,
and keeps the per-model `AdapterState` that every LoRA layer reads, which is
what makes `set_adapter` a single assignment.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

from torch import nn

from .config import LoraConfig, check_adapter_name
from .layers import AdapterState, LoraLayer, ModulesToSave, make_lora_layer
from .targets import SEQ_CLS_HEADS, find_modules_to_save, find_targets


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


def effective_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """config.modules_to_save, plus the classification head for task_type SEQ_CLS (as PEFT does)."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        present = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
        names += [head for head in SEQ_CLS_HEADS if head in present and head not in names]
    return names


class LoraModel(nn.Module):
    """A model with LoRA adapters. Anything it does not define is forwarded to `base_model`."""

    def __init__(self, model: nn.Module, config: LoraConfig | None, adapter_name: str = "default") -> None:
        """Wrap `model` with adapter `adapter_name` made from `config` (config=None: no adapter yet, for loading)."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model of type {type(model).__name__} is invalid: expected a torch nn.Module")
        # LoRA layers read their own LoraModel's AdapterState: a second wrapper's set_adapter would not reach them.
        wrapped = next((path for path, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))), None)
        if wrapped is not None:
            raise ValueError(f"model already has LoRA layers (at {wrapped!r}) from another LoraModel: expected a "
                             "model without LoRA; use that LoraModel's add_adapter/load_adapter, or unload() it first")
        self.base_model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.adapter_state = AdapterState()
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def active_adapter(self) -> str | None:
        return self.adapter_state.active

    # ---- running -------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Run the base model; `adapter_names` (one per sample, "__base__" = none) mixes adapters in a batch."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        from .batching import batch_size_of, mixed_adapters
        with mixed_adapters(self, adapter_names, batch_size_of(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        from .batching import batch_size_of, mixed_adapters
        with mixed_adapters(self, adapter_names, batch_size_of(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    # ---- the adapter set -----------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, LoraLayer):
                yield path, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    def check_adapter(self, adapter_name: str) -> None:
        """KeyError for a name that is not loaded (including a non-string, which never is)."""
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise KeyError(f"unknown adapter {adapter_name!r}: loaded adapters are {sorted(self.peft_config)}")

    def check_new_adapter(self, adapter_name: str, config: LoraConfig | None = None) -> None:
        """ValueError unless `adapter_name` is a valid, unused name (and `config` a LoraConfig)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists: delete it first or choose another name")
        if config is not None and not isinstance(config, LoraConfig):
            raise ValueError(f"config {config!r} is invalid: expected a LoraConfig")

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter `adapter_name` on the modules `config` selects (it is not made active)."""
        self.check_new_adapter(adapter_name, config)
        if config is None:
            raise ValueError("config None is invalid: expected a LoraConfig")
        model = self.base_model
        # Plan every change first: building a wrapper or reading a shape can raise, mutating cannot.
        saved = find_modules_to_save(model, effective_modules_to_save(model, config))
        for path in saved:
            if any(isinstance(m, LoraLayer) for m in model.get_submodule(path).modules()):
                raise ValueError(f"modules_to_save entry {path!r} already has LoRA layers: expected a module "
                                 "without LoRA (delete the adapters on it first)")
        # As in PEFT, a module trained in full (modules_to_save) takes no LoRA of its own.
        targets = [p for p in find_targets(model, config) if not any(p == s or p.startswith(s + ".") for s in saved)]
        if not targets:
            raise ValueError(f"target_modules={config.target_modules!r} selects only modules in modules_to_save "
                             f"{saved!r}: expected at least one other module")
        layers = self.plan_layers(config, [(path, model.get_submodule(path)) for path in targets])
        self.install_adapter(adapter_name, config, layers, saved, config.init_lora_weights)

    def plan_layers(self, config: LoraConfig, modules: list[tuple[str, nn.Module]]
                    ) -> list[tuple[str, nn.Module, LoraLayer]]:
        """(path, current module, LoRA layer to hold the adapter) per target; raises, changes nothing."""
        layers = []
        for path, module in modules:
            if isinstance(module, LoraLayer):
                _check_same_kind(path, module, config)
                layer = module
            else:
                layer = make_lora_layer(module, self.adapter_state, config.fan_in_fan_out, config.enable_lora)
            layer.adapter_shapes(config.rank_for(path))
            layers.append((path, module, layer))
        return layers

    def install_adapter(self, adapter_name: str, config: LoraConfig,
                        layers: list[tuple[str, nn.Module, LoraLayer]], saved: list[str],
                        init: bool | str | None) -> None:
        """Apply a plan from `plan_layers`: the mutating half of add_adapter.

        init=None leaves the new A/B uninitialised for a loader that fills them.
        Input errors were all raised by the plan; what can still fail here is
        allocation (out of memory for A/B), and then every change is undone
        before the error propagates, so even that leaves the model as it was.
        """
        model = self.base_model
        # Record only the flags _install can change (all, before the first adapter freezes the base;
        # biases for bias != "none"), so adding an adapter does not walk every loaded adapter's parameters.
        if not self.peft_config:
            touched = list(model.parameters())
        elif config.bias != "none":
            touched = [param for name, param in model.named_parameters() if name.endswith("bias")]
        else:
            touched = []
        trainable = [(param, param.requires_grad) for param in touched]
        wrapped = {path for path in saved if isinstance(model.get_submodule(path), ModulesToSave)}
        try:
            self._install(adapter_name, config, layers, saved, init)
        except BaseException:
            self._undo_install(adapter_name, layers, saved, wrapped, trainable)
            raise

    def _install(self, adapter_name: str, config: LoraConfig, layers: list[tuple[str, nn.Module, LoraLayer]],
                 saved: list[str], init: bool | str | None) -> None:
        model, state = self.base_model, self.adapter_state
        if not self.peft_config:
            model.requires_grad_(False)
        for path, module, layer in layers:
            if layer is not module:
                layer.training = module.training  # a new wrapper keeps its base's mode: no dropout in eval
                _replace(model, path, layer)
            layer.add_adapter(adapter_name, config.rank_for(path), config.scaling_for(path),
                              config.lora_dropout, init, config.merge_weights)
            layer.adapters[adapter_name].train(layer.training)
            layer.adapters[adapter_name].requires_grad_(not config.inference_mode)
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(not config.inference_mode)
        for path in saved:
            module = model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, state)
                module.training = module.original_module.training
                _replace(model, path, module)
            module.add_adapter(adapter_name)
            module.modules_to_save[adapter_name].requires_grad_(not config.inference_mode)
        if config.bias == "all":
            for name, param in model.named_parameters():
                # a saved module's original stays frozen (its copy trains in full), as in PEFT
                if name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name:
                    param.requires_grad_(not config.inference_mode)
        self.peft_config[adapter_name] = config

    def _undo_install(self, adapter_name: str, layers: list[tuple[str, nn.Module, LoraLayer]], saved: list[str],
                      wrapped: set[str], trainable: list[tuple[nn.Parameter, bool]]) -> None:
        """Take back a partial `_install`: records, new wrappers, requires_grad flags, the config entry."""
        model = self.base_model
        for path, module, layer in layers:
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
            if layer is not module and model.get_submodule(path) is layer:
                _replace(model, path, module)
        for path in saved:
            current = model.get_submodule(path)
            if isinstance(current, ModulesToSave):
                if adapter_name in current.modules_to_save:
                    del current.modules_to_save[adapter_name]
                if path not in wrapped:
                    _replace(model, path, current.original_module)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
        self.peft_config.pop(adapter_name, None)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one that runs: O(1), one assignment on the shared state."""
        self.check_adapter(adapter_name)
        if self.adapter_state.merged_count and adapter_name != self.active_adapter:
            warnings.warn(f"unmerging merged adapters before switching to {adapter_name!r}", stacklevel=2)
            self.unmerge_adapter()
        self.adapter_state.active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its parameters; if it was active, another (or none) becomes active."""
        self.check_adapter(adapter_name)
        if self.adapter_state.merged_count:
            self.unmerge_adapter()
        for _, layer in self.lora_layers():
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
        for _, module in self.saved_modules():
            if adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        if self.adapter_state.active == adapter_name:
            self.adapter_state.active = next(iter(self.peft_config), None)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves as the base model; merged adapters are unmerged and restored."""
        merged = self.merged_adapters()
        self.unmerge_adapter()
        previous = self.adapter_state.disabled
        self.adapter_state.disabled = True
        try:
            yield
        finally:
            self.adapter_state.disabled = previous
            if merged:
                self.merge_adapter(merged)

    # ---- merging -------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        """Adapter names merged into some layer, in merge order."""
        names: list[str] = []
        if self.adapter_state.merged_count:
            for _, layer in self.lora_layers():
                names += [n for n in layer.merged if n not in names]
        return names

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add ΔW of each named adapter (default: the active one) into the base weights."""
        names = self._names_or_active(adapter_names)
        already = [n for n in names if n in self.merged_adapters()]
        if already:
            raise ValueError(f"adapters {already!r} are already merged: unmerge_adapter() first")
        layers = [layer for _, layer in self.lora_layers()]
        if safe_merge:
            for name in names:
                if not all(layer.merge_is_finite(name) for layer in layers if name in layer.adapters):
                    raise ValueError(f"merging adapter {name!r} would produce NaN or Inf weights; nothing merged")
        for name in names:
            for layer in layers:
                if name in layer.adapters:
                    layer.merge(name)

    def unmerge_adapter(self) -> None:
        """Subtract every merged ΔW again, last merged first."""
        if self.adapter_state.merged_count:
            for _, layer in self.lora_layers():
                layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Merge, then return the base model with every LoRA module replaced by its (merged) base layer."""
        names = self._names_or_active(adapter_names)
        merged = self.merged_adapters()
        self.merge_adapter([n for n in names if n not in merged], safe_merge=safe_merge)
        return self._unwrap(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Return the base model exactly as it was: LoRA dropped, weights unmerged, saved modules restored."""
        self.unmerge_adapter()
        return self._unwrap(keep_saved_copy=False)

    def _unwrap(self, keep_saved_copy: bool) -> nn.Module:
        for path, layer in list(self.lora_layers()):
            _replace(self.base_model, path, layer.base_layer)
        for path, module in list(self.saved_modules()):
            _replace(self.base_model, path, module.active_module() if keep_saved_copy else module.original_module)
        self.adapter_state.merged_count = 0
        return self.base_model

    def _names_or_active(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            if self.active_adapter is None:
                raise ValueError("no adapter is active: pass adapter_names")
            return [self.active_adapter]
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names={adapter_names!r} is invalid: expected a list of adapter names")
        for name in adapter_names:
            self.check_adapter(name)
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"adapter_names={adapter_names!r} names an adapter twice: expected each at most once")
        return list(adapter_names)

    # ---- files and the Hub (files.py, hub.py) --------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None, **kwargs) -> None:
        """Write adapters in PEFT's format: "default" at the root, any other in a subfolder of its name."""
        from .files import save_adapters
        save_adapters(self, save_directory, selected_adapters, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, revision: str | None = None, subfolder: str | None = None,
                        token: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False) -> "LoraModel":
        """Wrap `model` with an adapter read from a directory or a Hub repo, and make it active.

        A failed load raises before any module of `model` changes.
        """
        lora_model = cls(model, None)
        lora_model.load_adapter(model_id_or_path, adapter_name, is_trainable, revision=revision,
                                subfolder=subfolder, token=token, cache_dir=cache_dir,
                                local_files_only=local_files_only)
        lora_model.set_adapter(adapter_name)
        return lora_model

    def load_adapter(self, model_id_or_path: str, adapter_name: str, is_trainable: bool = False,
                     **hub_kwargs: Any) -> None:
        """Read an adapter (PEFT's format) and add it under `adapter_name`, not active.

        Everything is validated before the first module changes, so on any error
        the model is left exactly as it was.
        """
        from .loading import load_adapter
        load_adapter(self, model_id_or_path, adapter_name, is_trainable, **hub_kwargs)

    def hotswap_adapter(self, model_id_or_path: str, adapter_name: str, **hub_kwargs: Any) -> None:
        """Load new weights into the existing adapter `adapter_name` in place (same modules and ranks).

        Parameters are copied into, never replaced, so compiled or captured
        models keep working; on any error nothing changes.
        """
        from .loading import hotswap_adapter
        hotswap_adapter(self, model_id_or_path, adapter_name, **hub_kwargs)

    def push_to_hub(self, repo_id: str, adapter_name: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None, revision: str | None = None):
        from .hub import push_adapter
        return push_adapter(self, repo_id, adapter_name=adapter_name, private=private, token=token,
                            commit_message=commit_message, revision=revision)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", svd_rank: int | None = None) -> None:
        from .combine import add_weighted_adapter
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    # ---- counting ------------------------------------------------------------
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


def _check_same_kind(path: str, layer: LoraLayer, config: LoraConfig) -> None:
    """A second adapter on an already wrapped fused layer must use the same slices."""
    existing = getattr(layer, "enable_lora", None)
    if existing != config.enable_lora:
        raise ValueError(
            f"module {path!r} already has LoRA with enable_lora={existing!r}; "
            f"a new adapter must use the same, got {config.enable_lora!r}"
        )


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap `model` (modified in place) with a new, active LoRA adapter."""
    if not isinstance(config, LoraConfig):  # LoraModel takes None (an empty wrapper for loading); this does not
        raise ValueError(f"config {config!r} is invalid: expected a LoraConfig")
    return LoraModel(model, config, adapter_name)
