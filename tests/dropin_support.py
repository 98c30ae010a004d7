"""What the drop-in tests share: run the same user code against `peft` and against `peftlite`.

User code is a function of `lib`, the `peft` module or the `peftlite` module (they
export the same names); `both` runs it with each and returns both results, and
`outcome` turns a call into what user code can observe of it (value or error type,
plus warnings).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import peft
import torch
from torch import nn

import peftlite
from tests.tiny_models import tiny_llama, token_batch

LIBS: dict[str, ModuleType] = {"peft": peft, "peftlite": peftlite}
Q_V = ["q_proj", "v_proj"]


def both(user_code: Callable[[ModuleType], Any]) -> tuple[Any, Any]:
    """(result with peft, result with peftlite) of the same user code."""
    return user_code(peft), user_code(peftlite)


def outcome(call: Callable[[], Any]) -> tuple[str, Any, list[str]]:
    """("ok", value, warnings) or ("raise", exception type, warnings): what user code can observe of a call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
        except Exception as err:  # the comparison is about which type each library raises
            return "raise", type(err), [str(w.message) for w in caught]
    return "ok", value, [str(w.message) for w in caught]


def llama_lora(lib: ModuleType, seed: int = 0, **config: Any) -> Any:
    """A tiny Llama with one adapter, its LoRA weights made non-zero so every check sees the adapter."""
    config = {"target_modules": Q_V, "init_lora_weights": False, **config}
    torch.manual_seed(seed + 100)
    return lib.get_peft_model(tiny_llama(seed), lib.LoraConfig(**config))


def same_weights(reference: nn.Module, model: nn.Module) -> None:
    """Copy every tensor of `reference` into `model`: the names are the same, so this is one load_state_dict."""
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(seed=seed)).logits
