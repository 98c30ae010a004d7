"""trainable_token_indices in the plan → install → undo flow: which rows of which modules train in full.

As PEFT's `set_additional_trainable_modules`: a list of ids names rows of the
model's input embedding (`get_input_embeddings()`, else a module named
`embed_tokens`); a dict maps module names (matched as target_modules lists
are: the path or a dotted suffix) to ids. When the model ties its output layer
to the input embedding (`config.tie_word_embeddings`, the same weight tensor),
that layer gets a tied adapter sharing the embedding's rows, unless a dict gives
it other ids (then each trains its own; `ensure_weight_tying=True` refuses that).
Everything is checked in `plan_tokens`, before the model changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..layers import AdapterState, LoraLayer, ModulesToSave
from ..layers.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from ..layers.walk import replace_module
from .targets import _is_selectable, matches


@dataclass(frozen=True)
class TokenTarget:
    """Rows `indices` of the weight at `path` train; `tied_to`: the embedding path whose rows it shares."""

    path: str
    indices: list[int]
    tied_to: str | None = None


def _base(module: nn.Module) -> Any:
    return module.original_module if isinstance(module, TrainableTokensWrapper) else module


def _takes_tokens(base: nn.Module) -> bool:
    """An nn.Embedding or nn.Linear, or a scaled embedding (Gemma's: nn.Embedding times `embed_scale`),
    which the layer computes as F.embedding · embed_scale, as PEFT does; no other subclass."""
    return type(base) in (nn.Embedding, nn.Linear) or (isinstance(base, nn.Embedding) and hasattr(base, "embed_scale"))


def input_embedding_path(model: nn.Module) -> str | None:
    """Path of `model.get_input_embeddings()` (PEFT's default target), or None without one."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except NotImplementedError:
        embedding = None
    return next((path for path, m in model.named_modules() if embedding is not None and m is embedding), None)


def requested_tokens(model: nn.Module, config: LoraConfig) -> list[TokenTarget]:
    """The modules `trainable_token_indices` names, with their own ids (no tied layers); ValueError
    for a name that matches nothing, a module that is not an Embedding or Linear, or an id out of range."""
    value = config.trainable_token_indices
    if value is None:
        return []
    wanted = value if isinstance(value, dict) else {input_embedding_path(model) or "embed_tokens": value}
    found = []
    for name, ids in wanted.items():
        paths = [p for p, _ in model.named_modules() if p and _is_selectable(p) and "token_adapter" not in p.split(".")
                 and matches(p, [name])]
        if not paths:
            raise ValueError(f"trainable_token_indices names module {name!r}, which matches no module of the model: "
                             "expected a module name such as 'embed_tokens'")
        for path in paths:
            base = _base(model.get_submodule(path))
            if not _takes_tokens(base):
                raise ValueError(f"trainable_token_indices module {path!r} is a {type(base).__name__}: expected an "
                                 "nn.Embedding (or an nn.Linear output layer) whose weight rows are tokens")
            rows = base.weight.shape[0]
            bad = [i for i in ids if i >= rows]
            if bad:
                raise ValueError(f"trainable_token_indices for {path!r} has token ids {bad} out of range: expected "
                                 f"ids from 0 to {rows - 1} ({path!r} has {rows} rows)")
            found.append(TokenTarget(path, list(ids)))
    return found


def _tied_paths(model: nn.Module, embedding_path: str) -> list[str]:
    """Modules whose weight is the input embedding's own tensor, when the model's config ties them."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) is not True:
        return []
    weight = _base(model.get_submodule(embedding_path)).weight
    return [path for path, module in model.named_modules() if path and path != embedding_path and _is_selectable(path)
            and "token_adapter" not in path.split(".") and getattr(_base(module), "weight", None) is weight]


def _tying(model: nn.Module, config: LoraConfig, targets: list[TokenTarget]
            ) -> tuple[TokenTarget | None, list[str]]:
    """(the input embedding's target, paths of layers tied to it that share its rows), as PEFT decides.

    A tied layer the dict gives other ids trains its own rows instead (ensure_weight_tying refuses that).
    """
    embedding_path = input_embedding_path(model)
    embedding = next((t for t in targets if t.path == embedding_path), None)
    if embedding is None:
        return None, []
    tied = _tied_paths(model, embedding.path)
    if any(t.indices != embedding.indices for t in targets if t.path in tied):
        if config.ensure_weight_tying:
            raise ValueError(f"ensure_weight_tying=True but tied layers get other token ids than the embedding: "
                             f"{ {t.path: t.indices for t in targets if t.path in tied} } vs "
                             f"{embedding.indices}: expected the same ids")
        return embedding, []
    return embedding, tied


def own_token_targets(model: nn.Module, config: LoraConfig) -> list[TokenTarget]:
    """The modules that hold rows of their own for `config` (the ones a file has keys for)."""
    targets = requested_tokens(model, config)
    tied = _tying(model, config, targets)[1]
    return [t for t in targets if t.path not in tied]


def plan_tokens(model: nn.Module, config: LoraConfig, lora_paths: list[str], saved: list[str]) -> list[TokenTarget]:
    """Every module that gets trainable-token rows for `config`, embeddings before their tied layers.

    Raises ValueError (changing nothing) for the cases above and for a module that
    also takes LoRA or is in modules_to_save (PEFT refuses both too).
    """
    targets = requested_tokens(model, config)
    embedding, tied = _tying(model, config, targets)
    for target in targets:
        module = model.get_submodule(target.path)
        if target.path in lora_paths or isinstance(module, LoraLayer):
            raise ValueError(f"module {target.path!r} is both a LoRA target and in trainable_token_indices: "
                             "expected one of them (PEFT refuses this too)")
        if target.path in saved or isinstance(module, ModulesToSave):
            raise ValueError(f"module {target.path!r} is both in modules_to_save and in trainable_token_indices: "
                             "expected one of them")
        if (target.path not in tied and isinstance(module, TrainableTokensWrapper)
                and module.token_adapter.tied_adapter is not None):
            raise ValueError(f"module {target.path!r} shares its rows with the input embedding (tied weights): "
                             "expected the embedding's token ids for it")
    if config.ensure_weight_tying and not tied:
        warnings.warn("ensure_weight_tying=True, but no layer tied to the input embedding shares its trainable "
                      "tokens (tie_word_embeddings=False, or the embedding has none): no rows are tied", stacklevel=4)
    for path in tied:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer) or path in lora_paths or path in saved:
            raise ValueError(f"module {path!r} is tied to the input embedding, which has trainable tokens, and also "
                             "takes LoRA or is in modules_to_save: expected neither (PEFT refuses this too)")
        if isinstance(module, TrainableTokensWrapper) and module.token_adapter.tied_adapter is None:
            raise ValueError(f"module {path!r} is tied to the input embedding but already trains token rows of "
                             "its own: expected one adapter layout for tied layers")
    tied_targets = [TokenTarget(p, embedding.indices, embedding.path) for p in tied] if embedding else []
    return [t for t in targets if t.path not in tied] + tied_targets


def install_tokens(model: nn.Module, state: AdapterState, targets: list[TokenTarget], name: str,
                   dtype_of: Callable[[torch.dtype], torch.dtype], trainable: bool) -> None:
    """Wrap each target (once) and add adapter `name`'s rows, starting as the current rows, in
    dtype_of(the base weight's dtype)."""
    for target in targets:
        module = model.get_submodule(target.path)
        if not isinstance(module, TrainableTokensWrapper):
            embedding = model.get_submodule(target.tied_to) if target.tied_to else None
            tied = embedding.token_adapter if isinstance(embedding, TrainableTokensWrapper) else None
            module = TrainableTokensWrapper(module, state, tied)
            module.training = module.original_module.training
            replace_module(model, target.path, module)
        dtype = dtype_of(_base(module).weight.dtype)
        module.token_adapter.update_layer(name, target.indices, dtype, trainable)


def undo_tokens(model: nn.Module, targets: list[TokenTarget], name: str, wrapped_before: set[str]) -> None:
    """Take back a partial `install_tokens`: the adapter's rows, and wrappers it added."""
    for target in reversed(targets):
        module = model.get_submodule(target.path)
        if isinstance(module, TrainableTokensWrapper):
            module.token_adapter.delete_adapter(name)
            if target.path not in wrapped_before:
                replace_module(model, target.path, module.original_module)


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokensWrapper]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


def token_layers(model: nn.Module) -> list[TrainableTokensLayer]:
    """Every trainable-tokens layer, embeddings before the layers tied to them."""
    layers = [m.token_adapter for _, m in token_wrappers(model)]
    return sorted(layers, key=lambda layer: layer.tied_adapter is not None)


def check_token_adapters(model: nn.Module, names: list[str]) -> None:
    """PEFT's rule for set_adapter: at most one of `names` may have trainable tokens on one layer."""
    if len(names) < 2:
        return  # switching to one adapter, the common case, walks nothing
    for path, wrapper in token_wrappers(model):
        own = [n for n in names if n in wrapper.token_adapter.trainable_tokens_delta]
        if len(own) > 1:
            raise ValueError(f"adapters {own} all have trainable tokens on {path!r}: expected only one of them "
                             "active at a time (as PEFT allows)")


def merge_tokens(model: nn.Module, names: list[str], safe_merge: bool) -> None:
    """Write adapters' rows into the weights; with safe_merge every layer is checked before any changes."""
    layers = token_layers(model)
    for layer in layers:
        todo = [n for n in names if n in layer.trainable_tokens_delta and n not in layer.merged_adapters]
        layer.check_overlap(todo)
        if safe_merge and not all(bool(layer.trainable_tokens_delta[n].isfinite().all()) for n in todo):
            raise ValueError(f"merging adapters {todo!r} would put NaN or Inf into token rows; nothing merged")
    for layer in layers:
        layer.merge(adapter_names=names)


def unwrap_tokens(model: nn.Module) -> None:
    """Replace every trainable-tokens wrapper by the module it wraps (rows as they are now)."""
    for path, wrapper in token_wrappers(model):
        replace_module(model, path, wrapper.original_module)
