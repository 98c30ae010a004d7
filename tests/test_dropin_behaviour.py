"""peftlite as a drop-in for PEFT: the behaviours PEFT's own tests found to differ, now as PEFT's (or stricter).

Error types, warnings and edge cases, each run against `peft` and `peftlite`
(tests/dropin_support.py); where peftlite raises and PEFT silently does something
worse, the test checks both.

    .venv/bin/python -m pytest -q tests/test_dropin_behaviour.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from torch import nn

from tests.dropin_support import LIBS, Q_V, both, llama_lora, logits, outcome, same_weights
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama


# ---- behaviour that used to differ ------------------------------------------------------------------------------
def test_unknown_adapter_names_raise_value_error() -> None:
    def calls(lib: ModuleType) -> list[Any]:
        model = llama_lora(lib)
        return [outcome(call)[:2] for call in (lambda: model.set_adapter("nope"),
                                               lambda: model.delete_adapter("nope"),
                                               lambda: model.merge_and_unload(adapter_names=["nope"]))]

    theirs, ours = both(calls)
    assert ours[:2] == theirs[:2] == [("raise", ValueError)] * 2
    # stricter: PEFT's merge_and_unload ignores an unknown name and merges nothing; peftlite raises
    assert ours[2] == ("raise", ValueError) and theirs[2][0] == "ok"


def test_merge_twice_warns_and_does_nothing() -> None:
    def run(lib: ModuleType) -> tuple[Any, torch.Tensor]:
        model = llama_lora(lib).eval()
        model.merge_adapter()
        once = logits(model)
        second = outcome(model.merge_adapter)
        return (second[0], bool(second[2])), torch.testing.assert_close(logits(model), once)

    theirs, ours = both(run)
    assert ours[0] == theirs[0] == ("ok", True)


def test_delete_merged_adapter_is_refused() -> None:
    def run(lib: ModuleType) -> Any:
        model = llama_lora(lib)
        model.add_adapter("b", lib.LoraConfig(target_modules=Q_V))
        model.merge_adapter()
        return outcome(lambda: model.delete_adapter("default"))[:2], sorted(model.peft_config)

    theirs, ours = both(run)
    assert ours == theirs
    assert ours[0] == ("raise", ValueError)


def test_second_bias_adapter_is_refused() -> None:
    def run(lib: ModuleType) -> Any:
        model = llama_lora(lib, bias="all")
        return outcome(lambda: model.add_adapter("b", lib.LoraConfig(target_modules=Q_V, bias="all")))[:2]

    theirs, ours = both(run)
    assert ours == theirs == ("raise", ValueError)


class WithContainers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.named = nn.ModuleDict({"a": nn.Linear(4, 4)})
        self.params = nn.ParameterList([nn.Parameter(torch.ones(4))])
        self.scales = nn.ParameterDict({"a": nn.Parameter(torch.ones(4))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.named["a"](self.blocks[0](self.lin(x))) * self.params[0] * self.scales["a"]


@pytest.mark.parametrize("container", ["blocks", "named", "params", "scales"])
def test_modules_to_save_container_is_refused(container: str) -> None:
    theirs, ours = both(lambda lib: outcome(lambda: lib.get_peft_model(
        WithContainers(), lib.LoraConfig(target_modules=["lin"], modules_to_save=[container])))[:2])
    assert ours[0] == theirs[0] == "raise"
    assert issubclass(ours[1], ValueError)


def test_bias_lora_only_with_embedding_target() -> None:
    def run(lib: ModuleType) -> Any:
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["wte", "c_attn"], bias="lora_only"))
        return [n for n, p in model.named_parameters() if p.requires_grad]

    theirs, ours = both(run)
    assert ours == theirs


class TupleHead(nn.Module):
    """A module that returns a tuple, as some heads and blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), x.sum(-1)


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = TupleHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, total = self.head(self.lin(x))
        return out + total[..., None]


def test_mixed_batch_through_modules_to_save_that_returns_a_tuple() -> None:
    def run(lib: ModuleType) -> nn.Module:
        torch.manual_seed(1)
        model = lib.get_peft_model(TupleModel(), lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"],
                                                                init_lora_weights=False))
        torch.manual_seed(2)
        model.add_adapter("b", lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"],
                                              init_lora_weights=False))
        for module in model.modules():
            if hasattr(module, "modules_to_save") and isinstance(module.modules_to_save, nn.ModuleDict):
                for i, copy in enumerate(module.modules_to_save.values()):
                    nn.init.constant_(copy.proj.bias, float(i + 1))
        return model.eval()

    theirs, ours = both(run)
    same_weights(theirs, ours)
    x = torch.randn(3, 8)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        mixed = ours(x, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                with theirs.disable_adapter():
                    expected = theirs(x[row:row + 1])
            else:
                theirs.set_adapter(name)
                expected = theirs(x[row:row + 1])
            torch.testing.assert_close(mixed[row:row + 1], expected)
    # PEFT 0.21.2 refuses mixed batches through a saved module that is not a Linear/Embedding/Conv
    assert outcome(lambda: theirs(x, adapter_names=names))[:2] == ("raise", TypeError)


def test_invalid_task_type_and_config_without_peft_type(tmp_path: Path) -> None:
    assert [outcome(lambda lib=lib: lib.LoraConfig(task_type="NOT_A_TASK"))[:2] for lib in LIBS.values()] == \
           [("raise", ValueError)] * 2
    llama_lora(peft).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["peft_type"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    theirs, ours = both(lambda lib: outcome(lambda: lib.PeftModel.from_pretrained(tiny_llama(), tmp_path))[:2])
    assert ours[0] == theirs[0] == "raise"
    assert ours[1] is ValueError


def test_seq_cls_modules_to_save_uses_the_heads_that_exist() -> None:
    def run(lib: ModuleType) -> Any:
        config = lib.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier", "score"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(tiny_bert(), config)
        return [n for n, p in model.named_parameters() if p.requires_grad]

    theirs, ours = both(run)
    assert ours == theirs
    assert any(".classifier.modules_to_save.default." in n for n in ours)


def test_has_active_enabled_adapter_follows_disabling() -> None:
    def run(lib: ModuleType) -> list[bool]:
        model = llama_lora(lib)
        seen = [model.has_active_enabled_adapter]
        with model.disable_adapter():
            seen.append(model.has_active_enabled_adapter)
            with model.disable_adapter():
                seen.append(model.has_active_enabled_adapter)
            seen.append(model.has_active_enabled_adapter)
        seen.append(model.has_active_enabled_adapter)
        model.disable_adapter_layers()
        seen.append(model.has_active_enabled_adapter)
        model.enable_adapter_layers()
        return [*seen, model.has_active_enabled_adapter]

    theirs, ours = both(run)
    assert ours[:5] == theirs[:5] == [True, False, False, False, True]
    assert ours[6] == theirs[6] is True
    # stricter: PEFT's property only sees disable_adapter(), so it stays True after disable_adapter_layers()
    assert theirs[5] is True and ours[5] is False
