"""The one walk over a model's modules that every model-wide operation uses, and the one way to put a module
at a path."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .base import LoraLayer
from .modules_to_save import ModulesToSave


def walk(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) like named_modules, but not into LoRA layers or ModulesToSave.

    Their children are adapters and trained copies, so stopping there keeps every
    walk's cost independent of how many adapters are loaded.
    """
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if isinstance(module, (LoraLayer, ModulesToSave)):
            if isinstance(module, LoraLayer):  # LoRA layers inside: nested parameter wrappers, MHA's out_proj
                base = module.base_layer
                inner = [("base_layer", base)] + [(f"base_layer.{n}", c) for n, c in base.named_children()]
                stack.extend((f"{path}.{n}", m) for n, m in reversed(inner) if isinstance(m, LoraLayer))
            continue
        children = [(f"{path}.{name}" if path else name, child)
                    for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))


def lora_layers(root: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(path, m) for path, m in walk(root) if isinstance(m, LoraLayer)]


def saved_modules(root: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(path, m) for path, m in walk(root) if isinstance(m, ModulesToSave)]


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` under `root` (its parent's attribute)."""
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)
