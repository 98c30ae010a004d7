"""peftlite as a drop-in for PEFT: object tree, names, status and the functional API, compared with `peft`.

Each test writes its user code once as a function of `lib` (the `peft` or the
`peftlite` module), runs it against both on the same tiny model
(tests/dropin_support.py) and compares what comes out: outputs, parameter and
state_dict names, return values. Where peftlite deliberately differs the test says so.

    .venv/bin/python -m pytest -q tests/test_dropin.py -p no:cacheprovider
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from torch import nn

import peftlite
from tests.dropin_support import Q_V, both, llama_lora, logits, outcome, same_weights
from tests.tiny_models import MLP, ConvNet, tiny_bert, tiny_gpt2, tiny_llama, token_batch


# ---- the object tree ----------------------------------------------------------------------------------------------
def test_object_tree_names_and_parameters() -> None:
    def tree(lib: ModuleType) -> dict[str, Any]:
        base = tiny_llama()
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=Q_V, r=4, lora_alpha=8))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        return {
            "base_model.model is the user's model": model.base_model.model is base,
            "get_base_model()": model.get_base_model() is base,
            "base_layer": type(layer.base_layer).__name__,
            "lora_A": (type(layer.lora_A["default"]).__name__, tuple(layer.lora_A["default"].weight.shape)),
            "lora_B": (type(layer.lora_B["default"]).__name__, tuple(layer.lora_B["default"].weight.shape)),
            "scaling": layer.scaling["default"],
            "r": layer.r["default"],
            "merged_adapters": list(layer.merged_adapters),
            "merged": layer.merged,
            "active_adapters": list(layer.active_adapters),
            "named_parameters": [(n, p.requires_grad, tuple(p.shape), p.dtype) for n, p in model.named_parameters()],
            "state_dict": list(model.state_dict()),
            # PEFT registers an empty DoRA container on every layer; peftlite only where DoRA is used
            "modules": [n for n, _ in model.named_modules() if not n.endswith("lora_magnitude_vector")],
            "base state_dict": list(base.state_dict()),
        }

    ours, theirs = both(tree)[::-1]
    assert ours == theirs


def test_object_tree_gpt2_and_embedding_names() -> None:
    def names(lib: ModuleType) -> tuple[list[str], list[str]]:
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["c_attn", "wte"], r=4))
        wte = model.base_model.model.transformer.wte
        return [n for n, _ in model.named_parameters()], [tuple(wte.lora_embedding_A["default"].shape)]

    peft_names, lite_names = both(names)
    assert lite_names == peft_names


def test_prefix_peft_type_config_and_active_names() -> None:
    def names(lib: ModuleType) -> dict[str, Any]:
        model = llama_lora(lib)
        model.add_adapter("other", lib.LoraConfig(target_modules=["k_proj"], r=2))
        return {
            "prefix": (model.base_model.prefix, model.prefix),  # PeftModel reads unknown names from the tuner
            "tuner names": [callable(getattr(model, name)) for name in (
                "inject_adapter", "add_weighted_adapter", "merge_adapter", "unmerge_adapter", "unload",
                "disable_adapter_layers", "enable_adapter_layers", "merge_and_unload")],
            "model names": (model.config.model_type, model.device.type, model.dtype),
            "peft_type": (model.peft_type == "LORA", model.peft_config["default"].peft_type == "LORA",
                          lib.LoraConfig().peft_type == "LORA"),
            "peft_config": sorted(model.peft_config),
            "active_adapter": model.active_adapter,
            "active_adapters": model.active_adapters,
            "active_peft_config r": model.active_peft_config.r,
            "targeted_module_names": sorted(model.targeted_module_names),
            "tuner targeted": sorted(model.base_model.targeted_module_names),
            "modules_to_save": model.modules_to_save,
        }

    peft_names, lite_names = both(names)
    assert lite_names == peft_names


def test_disable_and_enable_adapter_layers() -> None:
    def run(lib: ModuleType) -> list[torch.Tensor]:
        model = llama_lora(lib).eval()
        with_lora = logits(model)
        model.disable_adapter_layers()
        off = logits(model)
        model.enable_adapter_layers()
        return [with_lora, off, logits(model), logits(model.get_base_model())]

    theirs, ours = both(run)
    assert not torch.allclose(theirs[0], theirs[1])
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference)


def test_adapter_lifecycle_names_and_outputs() -> None:
    def build(lib: ModuleType) -> Any:
        model = llama_lora(lib).eval()
        model.add_adapter("b", lib.LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
        return model

    def run(model: Any) -> list[Any]:
        seen = [model.active_adapter, sorted(model.peft_config), model.get_nb_trainable_parameters()[1]]
        model.set_adapter("b")
        # PEFT turns a target_modules list into a set; peftlite keeps the list it was given
        seen += [model.active_adapter, set(model.active_peft_config.target_modules), logits(model)]
        with model.disable_adapter():
            seen.append(logits(model))
        model.delete_adapter("b")
        seen += [model.active_adapter, model.active_adapters, sorted(model.peft_config),
                 [n for n, _ in model.named_parameters()], logits(model)]
        return seen

    theirs, ours = both(build)
    same_weights(theirs, ours)
    for mine, reference in zip(run(ours), run(theirs)):
        if isinstance(reference, torch.Tensor):
            torch.testing.assert_close(mine, reference)
        else:
            assert mine == reference


def test_get_model_status_and_get_layer_status() -> None:
    def status(lib: ModuleType) -> tuple[Any, ...]:
        model = llama_lora(lib)
        model.add_adapter("other", lib.LoraConfig(target_modules=["q_proj"], r=2))
        model.base_model.set_adapter(["default", "other"])  # both trainable in both libraries (see below)
        snapshot = []  # PEFT's status shares lists with the layers: read each one at once
        for change in (model.merge_adapter, model.unmerge_adapter, model.disable_adapter_layers):
            change()
            snapshot.append(dataclasses.asdict(lib.get_model_status(model)))
            snapshot.append([dataclasses.asdict(s) for s in model.get_layer_status()])
        return snapshot

    theirs, ours = both(status)
    # disable_adapter_layers: PEFT also sets requires_grad=False on every adapter; peftlite flips no
    # requires_grad (see test_inactive_adapters_stay_trainable_unlike_peft)
    for snapshot in (theirs, ours):
        for status in (snapshot[4], *snapshot[5]):
            status.pop("requires_grad")
            status.pop("trainable_params", None)
    assert ours == theirs
    assert theirs[0]["merged_adapters"] == ["default", "other"] and theirs[4]["enabled"] is False


@pytest.mark.parametrize(("factory", "config"), [
    (ConvNet, {"target_modules": ["emb", "conv", "head"]}),
    (tiny_bert, {"target_modules": ["query"], "modules_to_save": ["classifier"]}),
    (tiny_gpt2, {"target_modules": ["c_attn"]}),
])
def test_status_per_layer_kind(factory: Callable[[], nn.Module], config: dict[str, Any]) -> None:
    def status(lib: ModuleType) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(factory(), lib.LoraConfig(**config))
        return dataclasses.asdict(model.get_model_status()), [dataclasses.asdict(s) for s in model.get_layer_status()]

    theirs, ours = both(status)
    assert ours == theirs


def test_status_of_an_injected_model_and_of_a_model_without_lora() -> None:
    def status(lib: ModuleType) -> Any:
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"]), MLP())
        return dataclasses.asdict(lib.get_model_status(model)), outcome(lambda: lib.get_layer_status(MLP()))[:2]

    theirs, ours = both(status)
    assert ours == theirs
    assert ours[1] == ("raise", ValueError)


def test_inactive_adapters_stay_trainable_unlike_peft() -> None:
    """Deliberate: peftlite's set_adapter is one assignment and flips no requires_grad.

    PEFT freezes every adapter that is not active (and unfreezes the active one) on
    add_adapter/set_adapter. Training gives the same result either way: an inactive
    adapter takes no part in forward, so it gets no gradient and optimizers skip it.
    Only trainable-parameter counts differ while several adapters are loaded.
    """
    def run(lib: ModuleType) -> tuple[set[str], torch.Tensor]:
        model = llama_lora(lib)
        model.add_adapter("b", lib.LoraConfig(target_modules=Q_V, init_lora_weights=False))
        model.set_adapter("b")
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = token_batch()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        unchanged = all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
        return {n for n, p in model.named_parameters() if p.requires_grad and ".default." in n}, unchanged

    theirs, ours = both(run)
    assert theirs[0] == set() and ours[0]  # the difference
    assert ours[1] and theirs[1]  # the same training result: the inactive adapter did not move


def test_set_adapter_list_sums_adapters_as_peft() -> None:
    def run(lib: ModuleType) -> Any:
        model = llama_lora(lib)
        torch.manual_seed(7)
        model.add_adapter("b", lib.LoraConfig(target_modules=["q_proj", "o_proj"], init_lora_weights=False))
        return model

    theirs, ours = both(run)
    same_weights(theirs, ours)
    theirs.eval(), ours.eval()
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == theirs.active_adapters == ["default", "b"]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
           [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    torch.testing.assert_close(logits(ours), logits(theirs))
    theirs.set_adapter("b"), ours.set_adapter("b")
    torch.testing.assert_close(logits(ours), logits(theirs))


# ---- the functional API -------------------------------------------------------------------------------------------
def test_get_and_set_peft_model_state_dict() -> None:
    theirs, ours = both(llama_lora)
    same_weights(theirs, ours)
    peft_sd = peft.get_peft_model_state_dict(theirs)
    lite_sd = peftlite.get_peft_model_state_dict(ours)
    assert list(lite_sd) == list(peft_sd)
    for key in peft_sd:
        torch.testing.assert_close(lite_sd[key], peft_sd[key])

    fresh_theirs, fresh_ours = both(lambda lib: llama_lora(lib, seed=0, init_lora_weights=True))
    their_result = peft.set_peft_model_state_dict(fresh_theirs, peft_sd)
    our_result = peftlite.set_peft_model_state_dict(fresh_ours, peft_sd)
    assert our_result.unexpected_keys == their_result.unexpected_keys == []
    assert [k for k in our_result.missing_keys if ".lora_" in k] == \
           [k for k in their_result.missing_keys if ".lora_" in k]
    torch.testing.assert_close(logits(fresh_ours.eval()), logits(fresh_theirs.eval()))
    torch.testing.assert_close(logits(fresh_ours), logits(theirs.eval()))


STATE_DICT_CASES = {
    "bert head": (tiny_bert, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    "gpt2 lora_only bias": (tiny_gpt2, {"target_modules": ["c_attn"], "bias": "lora_only"}),
    "gpt2 embedding": (tiny_gpt2, {"target_modules": ["wte", "c_fc"]}),
    "llama all bias": (tiny_llama, {"target_modules": ["q_proj", "down_proj"], "bias": "all", "r": 2}),
}


@pytest.mark.parametrize("case", STATE_DICT_CASES)
def test_peft_model_state_dict_round_trip_across_libraries(case: str) -> None:
    factory, config = STATE_DICT_CASES[case]

    def wrap(lib: ModuleType) -> Any:
        torch.manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lib.get_peft_model(factory(), lib.LoraConfig(init_lora_weights=False, **config))

    theirs, ours = both(wrap)
    same_weights(theirs, ours)
    peft_sd, lite_sd = peft.get_peft_model_state_dict(theirs), peftlite.get_peft_model_state_dict(ours)
    assert sorted(lite_sd) == sorted(peft_sd)
    for key in peft_sd:
        torch.testing.assert_close(lite_sd[key], peft_sd[key])
    # a state_dict gathered elsewhere (FSDP, ZeRO-3) is what PEFT reads when it is passed
    gathered = {k: v * 2 for k, v in theirs.state_dict().items()}
    peft_gathered = peft.get_peft_model_state_dict(theirs, state_dict=gathered)
    lite_gathered = peftlite.get_peft_model_state_dict(ours, state_dict=gathered)
    assert sorted(lite_gathered) == sorted(peft_gathered)
    for key in peft_gathered:
        torch.testing.assert_close(lite_gathered[key], peft_gathered[key])
    fresh = wrap(peftlite)
    result = peftlite.set_peft_model_state_dict(fresh, peft_sd)
    assert result.unexpected_keys == []
    ids = token_batch(vocab=100)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, theirs.eval()(ids).logits)


def test_inject_adapter_in_model_plain_module() -> None:
    def inject(lib: ModuleType) -> nn.Module:
        torch.manual_seed(3)
        return lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                                           MLP())

    theirs, ours = both(inject)
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
           [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    same_weights(theirs, ours)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x))
    peft_sd = peft.get_peft_model_state_dict(theirs)
    assert list(peftlite.get_peft_model_state_dict(ours)) == list(peft_sd)


def test_inject_adapter_in_model_twice_adds_a_second_active_adapter() -> None:
    def inject(lib: ModuleType) -> nn.Module:
        torch.manual_seed(3)
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False), MLP())
        return lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                                           model, adapter_name="b")

    theirs, ours = both(inject)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.lin0.active_adapters == theirs.lin0.active_adapters == ["b"]
    assert sorted(ours.peft_config) == sorted(theirs.peft_config) == ["b", "default"]
    same_weights(theirs, ours)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x))
    assert list(peftlite.get_peft_model_state_dict(ours, adapter_name="b")) == \
           list(peft.get_peft_model_state_dict(theirs, adapter_name="b"))


def test_inject_adapter_in_model_low_cpu_mem_usage_then_set() -> None:
    theirs, ours = both(lambda lib: lib.inject_adapter_in_model(
        lib.LoraConfig(target_modules=["lin0"]), MLP(), low_cpu_mem_usage=True))
    assert {p.device.type for n, p in ours.named_parameters() if "lora_" in n} == \
           {p.device.type for n, p in theirs.named_parameters() if "lora_" in n} == {"meta"}
    values = {"lin0.lora_A.weight": torch.randn(8, 10), "lin0.lora_B.weight": torch.randn(20, 8)}
    peft.set_peft_model_state_dict(theirs, values, low_cpu_mem_usage=True)
    peftlite.set_peft_model_state_dict(ours, values, low_cpu_mem_usage=True)
    x = torch.randn(3, 10)
    torch.testing.assert_close(ours(x), theirs(x))


def test_get_and_set_base_model_state_dict() -> None:
    theirs, ours = both(llama_lora)
    peft_base = peft.get_base_model_state_dict(theirs)
    lite_base = peftlite.get_base_model_state_dict(ours)
    assert list(lite_base) == list(peft_base) == list(tiny_llama().state_dict())
    other = tiny_llama(seed=5).state_dict()
    their_result = peft.set_base_model_state_dict(theirs, other)
    our_result = peftlite.set_base_model_state_dict(ours, other)
    assert tuple(our_result) == tuple(their_result)
    same = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    ours.load_state_dict(same, strict=False)
    torch.testing.assert_close(logits(ours), logits(theirs))
