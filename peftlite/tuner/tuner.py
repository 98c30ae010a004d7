"""LoraTuner: PEFT's `LoraModel`, the object at `peft_model.base_model`.

It holds the user's model at `.model` (modified in place: LoRA layers replace
the targets), the adapters' configs, and the `AdapterState` every LoRA layer of
this model reads. It finds, replaces and delegates; the math is in the layers.
Every call that changes the model validates completely first, so a failed
call changes nothing, and holds the state's lock, so two threads changing one
model take turns.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import BASE_NAME, LoraConfig, check_adapter_name
from ..layers import AdapterState, LoraLayer, ModulesToSave, Routing
from ..layers.gate import DISABLED
from ..layers.mixed import ROUTING
from ..layers.walk import lora_layers, replace_module, saved_modules
from .combine import add_weighted_adapter
from .inject import install, plan_adapter
from .tokens import check_token_adapters, merge_tokens, token_layers, unwrap_tokens


def fast_path_default() -> bool:
    """The fast-path switch a new model starts with: on, unless PEFTLITE_FAST_PATH=0."""
    return os.environ.get("PEFTLITE_FAST_PATH", "1").strip().lower() not in ("0", "false", "no", "off")


class LoraTuner(nn.Module):
    """The LoRA tuner around `model`. Attributes it lacks are read from `model`."""

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig | dict[str, LoraConfig] | None,
                 adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model of type {type(model).__name__} is invalid: expected a torch nn.Module")
        wrapped = next((path for path, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))), None)
        if wrapped is not None:
            raise ValueError(f"model already has LoRA layers (at {wrapped!r}) from another LoraModel: expected a "
                             "model without LoRA; use that LoraModel's add_adapter/load_adapter, or unload() it first")
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.adapter_state = AdapterState(fast=fast_path_default())
        self.targeted_module_names: list[str] = []
        self.unloaded = False
        # {adapter: [(base tensor, its value before that adapter's file overwrote it)]}: biases or
        # embedding weights a PEFT file carries; delete_adapter and unload() put them back.
        self.base_backups: dict[str, list[tuple[Tensor, Tensor]]] = {}
        if isinstance(config, dict):
            if len(config) != 1:
                raise ValueError(f"config {config!r} is invalid: expected one LoraConfig (or {{name: LoraConfig}})")
            adapter_name, config = next(iter(config.items()))
        if config is not None:
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                             autocast_adapter_dtype=autocast_adapter_dtype)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- running ---------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; `adapter_names` (one per sample, "__base__" = none) mixes adapters in one batch.

        Runs beside other threads' forwards; a model change waits for it (layers/gate.py).
        """
        with self._running():
            if adapter_names is None:
                return self.model(*args, **kwargs)
            with self.mixed_adapters(adapter_names, batch_size_of(args, kwargs), exact_rows=True):
                return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self._running():
            model: Any = self.model
            if adapter_names is None:
                return model.generate(*args, **kwargs)
            with self.mixed_adapters(adapter_names, batch_size_of(args, kwargs)):
                return model.generate(*args, **kwargs)

    def _running(self) -> contextlib.AbstractContextManager:
        """The forward side of the model's lock; nothing while torch.compile traces (no graph break)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self.adapter_state.lock.running()

    @contextlib.contextmanager
    def mixed_adapters(self, adapter_names: Sequence[str], batch_size: int | None = None,
                       exact_rows: bool = False) -> Iterator[Routing]:
        """Inside the block, this thread's calls of the model run sample i with adapter_names[i].

        Raises ValueError before anything runs: a non-list, a wrong length, an unknown
        name, training mode, merged weights, or a variant that takes no mixed batches.
        """
        names = self._check_mixed_names(adapter_names)
        if batch_size is not None and batch_size != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} samples: "
                             "expected one adapter name per sample")
        routing = Routing(self.adapter_state, names, exact_rows)
        token = ROUTING.set({**ROUTING.get(), self.adapter_state: routing})
        self.adapter_state.mixed_calls.append(token)
        try:
            yield routing
        finally:
            self.adapter_state.mixed_calls.remove(token)
            ROUTING.reset(token)

    def _check_mixed_names(self, adapter_names: Any) -> list[str]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names={adapter_names!r} is invalid: expected a list of adapter names, "
                             "one per sample")
        if not adapter_names:
            raise ValueError("adapter_names is empty: expected one adapter name per sample")
        for name in adapter_names:
            if not isinstance(name, str):
                raise ValueError(f"adapter_names entry {name!r} is invalid: expected a string")
            if name != BASE_NAME:
                self.check_adapter(name, what="in adapter_names")
        if self.model.training:
            raise ValueError("adapter_names cannot be used in training mode: call model.eval() first")
        if self.adapter_state.merged_count:
            raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first")
        for name in set(adapter_names) - {BASE_NAME}:
            for _, layer in self.lora_layers():
                if name in layer.adapters and not layer.adapters[name].variant.mixed_batches:
                    raise ValueError(f"adapter {name!r} is {layer.adapters[name].variant.name}, which mixed-adapter "
                                     "batches do not support: expected plain LoRA adapters in adapter_names")
                break
        return list(adapter_names)

    # ---- the adapter set ---------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_state.active)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name (a list when several are active), as PEFT reports it."""
        active = self.adapter_state.active
        return active[0] if len(active) == 1 else (list(active) if active else None)

    def lora_layers(self) -> list[tuple[str, LoraLayer]]:
        return lora_layers(self.model)

    def saved_modules(self) -> list[tuple[str, ModulesToSave]]:
        return saved_modules(self.model)

    def check_adapter(self, adapter_name: object, what: str = "") -> str:
        """ValueError (as PEFT raises) for a name that is not loaded."""
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}{' ' + what if what else ''}: not found among the "
                             f"loaded adapters {sorted(self.peft_config)}"
                             + (f" (or {BASE_NAME!r} for none)" if what else ""))
        return adapter_name

    def check_new_adapter(self, adapter_name: object, config: object = None) -> None:
        """ValueError unless `adapter_name` is a valid, unused name (and `config` a LoraConfig)."""
        if self.unloaded:
            raise ValueError("this LoraModel was unloaded (merge_and_unload/unload returned its model): wrap the "
                             "returned model in a new LoraModel to add adapters to it")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists: delete it first or choose another name")
        if config is not None and not isinstance(config, LoraConfig):
            raise ValueError(f"config {config!r} is invalid: expected a LoraConfig")

    def add_adapter(self, adapter_name: str, config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add adapter `adapter_name` on the modules `config` selects (it is not made active)."""
        with self.adapter_state.lock:
            self.check_new_adapter(adapter_name, config)
            if config is None:
                raise ValueError("config None is invalid: expected a LoraConfig")
            plan = plan_adapter(self.model, self.adapter_state, adapter_name, config, self.peft_config)
            self.install(plan, config.init_lora_weights, autocast_adapter_dtype, low_cpu_mem_usage)

    inject_adapter = add_adapter

    def install(self, plan: Any, init: bool | str | None, autocast_adapter_dtype: bool = True,
                low_cpu_mem_usage: bool = False) -> None:
        """Apply a plan from `plan_adapter` and record the adapter's config (its mutating half)."""
        install(self.model, self.adapter_state, plan, init, autocast_adapter_dtype, low_cpu_mem_usage,
                first=not self.peft_config)
        self.peft_config[plan.adapter_name] = plan.config
        known = set(self.targeted_module_names)
        self.targeted_module_names += [path for path, _, _ in plan.layers if path not in known]

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make `adapter_name` (or several, whose updates add up) the adapters that run: one assignment."""
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"adapter_name={adapter_name!r} is invalid: expected an adapter name or a list of them")
        for name in names:
            self.check_adapter(name)
        check_token_adapters(self.model, list(names))
        with self.adapter_state.lock:
            if self.adapter_state.merged_count and tuple(names) != self.adapter_state.active:
                warnings.warn(f"unmerging merged adapters before switching to {adapter_name!r}", stacklevel=2)
                self.unmerge_adapter()
            self.adapter_state.active = tuple(dict.fromkeys(names))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its parameters; if it was active, the first other one (or none) becomes active."""
        with self.adapter_state.lock:
            self.check_adapter(adapter_name)
            merged = self.merged_adapters()
            if adapter_name in merged:
                raise ValueError(f"adapter {adapter_name!r} is merged into the base weights: unmerge_adapter() "
                                 "before deleting it")
            for _, layer in self.lora_layers():
                layer.delete_adapter(adapter_name)
            for module in [m for _, m in self.saved_modules()] + token_layers(self.model):
                module.delete_adapter(adapter_name)
            self._restore_base([adapter_name])
            del self.peft_config[adapter_name]
            state = self.adapter_state
            if adapter_name in state.active:
                rest = tuple(n for n in state.active if n != adapter_name)
                state.active = rest or tuple(list(self.peft_config)[:1])

    def enable_adapter_layers(self) -> None:
        with self.adapter_state.lock:
            self.adapter_state.disabled_everywhere = False

    def disable_adapter_layers(self) -> None:
        """Adapters off until enable_adapter_layers(); merged adapters are unmerged first, as in PEFT."""
        with self.adapter_state.lock:
            if self.adapter_state.merged_count:
                warnings.warn("unmerging merged adapters before disabling them", stacklevel=2)
                self.unmerge_adapter()
            self.adapter_state.disabled_everywhere = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model runs as the base model; merged adapters are unmerged and restored.

        Model-wide, as in PEFT (threads of nn.DataParallel see it too), except for mixed
        batches: their adapter_names name adapters explicitly, so only a block opened in
        their own thread turns them off. Blocks in several threads nest by count.
        """
        state = self.adapter_state
        with state.lock:
            merged = self.merged_adapters()
            self.unmerge_adapter()
            state.disable_depth += 1
            token = DISABLED.set(DISABLED.get() | {state})
        try:
            yield
        finally:
            with state.lock:
                DISABLED.reset(token)
                state.disable_depth -= 1
                if merged and not state.disable_depth:
                    self.merge_adapter(merged)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", svd_rank: int | None = None, **ignored: Any) -> None:
        """A new adapter made from a weighted combination of loaded ones (see tuner/combine.py)."""
        if ignored:
            warnings.warn(f"add_weighted_adapter ignores {sorted(ignored)}", stacklevel=2)
        with self.adapter_state.lock:
            add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    # ---- merging ---------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        """Adapter names merged into some layer, in merge order."""
        names: list[str] = []
        if self.adapter_state.merged_count:
            for layer in [lora for _, lora in self.lora_layers()] + token_layers(self.model):
                names += [n for n in layer.merged_adapters if n not in names]
        return names

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add each named adapter (default: the active ones) into the base weights.

        Already merged adapters are skipped with a warning, as in PEFT. With safe_merge the
        final weights of every layer are checked first; on NaN or Inf nothing is merged.
        """
        with self.adapter_state.lock:
            names = self._names_or_active(adapter_names)
            already = [n for n in names if n in self.merged_adapters()]
            if already:
                warnings.warn(f"adapters {already!r} are already merged; merging them again is skipped", stacklevel=2)
            names = [n for n in names if n not in already]
            layers = [layer for _, layer in self.lora_layers()]
            if safe_merge:
                self._check_finite_merge(layers, names)
            self._warn_tied(names)
            merge_tokens(self.model, names, safe_merge)
            for layer in layers:
                layer.merge(adapter_names=[n for n in names if n in layer.adapters])

    def _warn_tied(self, names: list[str]) -> None:
        """Warn, as PEFT does, when a merge writes into a weight another module shares (tied lm_head/embeddings)."""
        owners: dict[int, list[str]] = {}
        for path, param in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(path)
        for path, layer in self.lora_layers():
            weight = getattr(layer.base_layer, "weight", None)
            if weight is not None and len(owners.get(id(weight), ())) > 1 and set(names) & set(layer.adapters):
                warnings.warn(f"merging into {path!r} also changes {owners[id(weight)]}: their weights are tied; "
                              "the merged model's tied modules all carry this adapter's update", stacklevel=3)

    def _check_finite_merge(self, layers: list[LoraLayer], names: list[str]) -> None:
        for layer in layers:
            weight = layer.merge_target().detach()
            for name in names:
                if name in layer.adapters:
                    weight = layer.adapters[name].variant.merged_weight(layer, name, weight)
            if not bool(weight.isfinite().all()):
                raise ValueError(f"merging adapters {names!r} would put NaN or Inf into a "
                                 f"{type(layer.base_layer).__name__} weight; nothing merged")

    def unmerge_adapter(self) -> None:
        """Take every merged update out again, last merged first."""
        with self.adapter_state.lock:
            if self.adapter_state.merged_count:
                for layer in [lora for _, lora in self.lora_layers()] + token_layers(self.model):
                    layer.unmerge()

    def merge_plan(self, adapter_names: list[str] | str | None, safe_merge: bool) -> tuple[list[str], list[LoraLayer]]:
        """(adapters still to merge, every LoRA layer), validated; with safe_merge, NaN/Inf results refused."""
        names = self._names_or_active(adapter_names)
        merged = self.merged_adapters()
        todo = [n for n in names if n not in merged]
        layers = [layer for _, layer in self.lora_layers()]
        if safe_merge:
            self._check_finite_merge(layers, todo)
        return todo, layers

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the model with every LoRA module replaced by its (merged) base layer."""
        if isinstance(progressbar, (list, tuple, str)):  # SPEC's merge_and_unload(adapter_names, safe_merge)
            progressbar, adapter_names = False, progressbar
        with self.adapter_state.lock:
            todo, layers = self.merge_plan(adapter_names, safe_merge)
            self._warn_tied(todo)
            merge_tokens(self.model, todo, safe_merge)
            for layer in tqdm(layers, disable=not progressbar, desc="Unloading and merging model"):
                layer.merge(adapter_names=[n for n in todo if n in layer.adapters])
            return self._unwrap(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Return the model exactly as it was: LoRA dropped, weights unmerged, saved modules restored."""
        with self.adapter_state.lock:
            self.unmerge_adapter()
            self._restore_base(list(reversed(self.base_backups)))
            return self._unwrap(keep_saved_copy=False)

    def _restore_base(self, adapter_names: list[str]) -> None:
        """Put back the base tensors (biases, embedding weights) these adapters' files overwrote."""
        with torch.no_grad():
            for name in adapter_names:
                for target, original in self.base_backups.pop(name, []):
                    target.copy_(original)

    def _unwrap(self, keep_saved_copy: bool) -> nn.Module:
        for path, layer in reversed(self.lora_layers()):  # inner first: MHA's out_proj before the MHA
            if path.rpartition(".")[2] == "base_layer":
                continue  # a nested parameter wrapper: its outermost wrapper is replaced by the module
            base = layer.base_layer
            while isinstance(base, LoraLayer):
                base = base.base_layer
            replace_module(self.model, path, base)
        for path, module in self.saved_modules():
            replace_module(self.model, path, module.active_module() if keep_saved_copy else module.original_module)
        unwrap_tokens(self.model)
        self.adapter_state.merged_count = 0
        self.unloaded = True
        return self.model

    def _names_or_active(self, adapter_names: list[str] | str | None) -> list[str]:
        if adapter_names is None:
            if not self.adapter_state.active:
                raise ValueError("no adapter is active: pass adapter_names")
            return list(self.adapter_state.active)
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names={adapter_names!r} is invalid: expected a list of adapter names")
        for name in adapter_names:
            self.check_adapter(name)
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"adapter_names={adapter_names!r} names an adapter twice: expected each at most once")
        return list(adapter_names)


def batch_size_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: dim 0 of the first tensor input (inside dicts, lists and
    tuples too, e.g. a model taking a dict of tensors), or None if there is none."""
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key].shape[0]
    values = [*args, *kwargs.values()]
    while values:
        value = values.pop(0)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, dict):
            values[:0] = list(value.values())
        elif isinstance(value, (list, tuple)):
            values[:0] = list(value)
    return None
