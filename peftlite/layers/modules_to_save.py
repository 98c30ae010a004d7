"""Modules trained in full per adapter (e.g. a classification head), as PEFT's ModulesToSaveWrapper."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .base import AdapterState
from .mixed import active_routing, mixed_saved_forward


class ModulesToSave(nn.Module):
    """The original module plus one trainable copy per adapter.

    The copy of the first active adapter that has one runs; with none (or adapters
    disabled) the untouched original runs. `unload` puts the original back.
    """

    def __init__(self, original_module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.state = state

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    @property
    def active_adapters(self) -> list[str]:
        return [name for name in self.state.active if name in self.modules_to_save]

    @property
    def disable_adapters(self) -> bool:
        return self.state.disabled

    def active_module(self) -> nn.Module:
        if not self.state.disabled:
            for name in self.state.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    @property
    def weight(self) -> Any:
        return self.active_module().weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = active_routing(self.state)
        if routing is not None and args:  # a mixed-adapter batch: each sample its own copy
            return mixed_saved_forward(self, routing, *args, **kwargs)
        return self.active_module()(*args, **kwargs)
