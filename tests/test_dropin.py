"""peftlite as a drop-in for PEFT: the same user code, run against `peft` and against `peftlite`, same results.

Each test writes its user code once as a function of `lib` (the `peft` module or
the `peftlite` module, which export the same names), runs it against both on the
same tiny model, and compares what comes out: outputs, parameter and state_dict
names, return values, error types, warnings. Where peftlite is deliberately
stricter or safer than PEFT the test says so and checks our behaviour.

    .venv/bin/python -m pytest -q tests/test_dropin.py -p no:cacheprovider
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from tests.tiny_models import LLAMA_TARGETS, MLP, ConvNet, tiny_bert, tiny_gpt2, tiny_llama, token_batch

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


# ---- files: save_pretrained, from_pretrained, load_adapter ----------------------------------------------------------
def saved_files(directory: Path) -> dict[str, Any]:
    """What a directory written by save_pretrained holds: files, tensor keys and config fields PEFT reads."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    tensors = {f: sorted(load_file(directory / f)) for f in files if f.endswith(".safetensors")}
    return {"files": files, "tensors": tensors}


def test_save_pretrained_keywords(tmp_path: Path) -> None:
    def save(lib: ModuleType) -> dict[str, Any]:
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["c_attn", "wte"], r=4))
        model.add_adapter("second", lib.LoraConfig(target_modules=["c_attn"], r=2))
        out = tmp_path / lib.__name__
        model.save_pretrained(out / "all", safe_serialization=True, save_embedding_layers=False)
        model.save_pretrained(out / "one", selected_adapters=["second"])
        return {"all": saved_files(out / "all"), "one": saved_files(out / "one")}

    theirs, ours = both(save)
    # PEFT writes one README.md at the top of every save; peftlite one per adapter folder it writes,
    # so that push_to_hub(adapter_name=...) of a subfolder uploads a card with it.
    assert "README.md" in ours["all"]["files"] and "second/README.md" in ours["one"]["files"]
    for layout in (theirs, ours):
        for saved in layout.values():
            saved["files"] = [f for f in saved["files"] if not f.endswith("README.md")]
    assert ours == theirs


def test_save_embedding_layers_true_is_refused(tmp_path: Path) -> None:
    """Stricter: PEFT writes base embedding tables into the adapter; peftlite refuses rather than drop them."""
    model = llama_lora(peftlite)
    with pytest.raises(ValueError, match="save_embedding_layers=True"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_from_pretrained_keywords_eval_mode_and_load_result(tmp_path: Path) -> None:
    reference = llama_lora(peft, lora_dropout=0.1)
    reference.save_pretrained(tmp_path / "adapter")
    reference.eval()

    def load(lib: ModuleType) -> dict[str, Any]:
        model = lib.PeftModel.from_pretrained(
            tiny_llama(), tmp_path / "adapter", config=lib.LoraConfig.from_pretrained(str(tmp_path / "adapter")),
            autocast_adapter_dtype=True, low_cpu_mem_usage=False, ephemeral_gpu_offload=False, torch_device="cpu",
            is_trainable=False)
        result = model.load_adapter(str(tmp_path / "adapter"), adapter_name="again", is_trainable=True)
        return {"training": [m.training for m in model.modules()], "result": (result.missing_keys,
                                                                              result.unexpected_keys),
                "logits": logits(model), "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}

    theirs, ours = both(load)
    assert not any(ours["training"]) and not any(theirs["training"])
    assert ours["result"] == theirs["result"]
    assert ours["trainable"] == theirs["trainable"]
    torch.testing.assert_close(ours["logits"], theirs["logits"])
    torch.testing.assert_close(ours["logits"], logits(reference))


@pytest.mark.parametrize("keyword", [{"device_map": "cpu"}, {"torch_device": "cpu"}, {"ephemeral_gpu_offload": False},
                                     {"use_safetensors": True}, {"max_memory": None}, {"low_cpu_mem_usage": True},
                                     {"autocast_adapter_dtype": False}, {"revision": None}])
def test_from_pretrained_accepts_peft_keywords(tmp_path: Path, keyword: dict[str, Any]) -> None:
    reference = llama_lora(peft)
    reference.save_pretrained(tmp_path)
    theirs, ours = both(lambda lib: logits(lib.PeftModel.from_pretrained(tiny_llama(), tmp_path, **keyword)))
    torch.testing.assert_close(ours, theirs)


def test_from_pretrained_key_mapping_and_load_adapter_eval_mode(tmp_path: Path) -> None:
    """An adapter saved with other module names loads through PEFT's key_mapping (regexes on unprefixed keys)."""
    reference = llama_lora(peft)
    tensors = {k.replace(".self_attn.", ".attention."): v for k, v in peft.get_peft_model_state_dict(reference).items()}
    reference.save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    mapping = {r"\.attention\.": ".self_attn."}

    def load(lib: ModuleType) -> tuple[torch.Tensor, bool, list[bool]]:
        model = lib.PeftModel.from_pretrained(tiny_llama().train(), tmp_path, key_mapping=mapping, is_trainable=True)
        trained = model.training
        model.load_adapter(tmp_path, "second", key_mapping=mapping)
        return logits(model), trained, [m.training for m in model.modules()]

    theirs, ours = both(load)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[0], logits(reference.eval()))
    assert ours[1] is theirs[1] is True
    assert not any(ours[2]) and not any(theirs[2])  # load_adapter(is_trainable=False) puts the model in eval mode, as PEFT


def test_from_pretrained_low_cpu_mem_usage(tmp_path: Path) -> None:
    reference = llama_lora(peft)
    reference.save_pretrained(tmp_path)

    def load(lib: ModuleType) -> tuple[torch.Tensor, set[str]]:
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
        return logits(model), {p.device.type for p in model.parameters()}

    (their_logits, their_devices), (our_logits, our_devices) = both(load)
    assert our_devices == their_devices == {"cpu"}
    torch.testing.assert_close(our_logits, their_logits)
    torch.testing.assert_close(our_logits, logits(reference.eval()))


def test_low_cpu_mem_usage_meta_base_stays_on_meta_and_adapter_is_filled(tmp_path: Path) -> None:
    """Stricter than PEFT 0.21.2, which leaves the loaded LoRA weights on meta over a meta base (they are lost)."""
    llama_lora(peft).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    with torch.device("meta"):
        base = tiny_llama()
    model = peftlite.PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for n, p in model.named_parameters() if "lora_" not in n} == {"meta"}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_A["default"].weight.device.type != "meta"
    torch.testing.assert_close(layer.lora_A["default"].weight,
                               saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])

    with torch.device("meta"):
        peft_base = tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(peft_base, tmp_path, low_cpu_mem_usage=True)
    peft_layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert peft_layer.lora_A["default"].weight.device.type == "meta"  # PEFT's weights are gone


def test_get_peft_model_low_cpu_mem_usage_puts_adapters_on_meta() -> None:
    theirs, ours = both(lambda lib: lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=Q_V),
                                                       low_cpu_mem_usage=True))
    assert [(n, p.device.type) for n, p in ours.named_parameters()] == \
           [(n, p.device.type) for n, p in theirs.named_parameters()]


def test_ignore_mismatched_sizes(tmp_path: Path) -> None:
    llama_lora(peft, r=4).save_pretrained(tmp_path)
    wrong = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}

    def load(lib: ModuleType) -> Any:
        model = llama_lora(lib, r=8, init_lora_weights=True)
        strict = outcome(lambda: lib.set_peft_model_state_dict(model, wrong))[:2]
        loose = outcome(lambda: lib.set_peft_model_state_dict(model, wrong, ignore_mismatched_sizes=True))
        return strict, loose, logits(model)

    theirs, ours = both(load)
    assert ours[0][0] == theirs[0][0] == "raise"
    assert ours[1][0] == theirs[1][0] == "ok"
    assert bool(ours[1][2]) == bool(theirs[1][2])  # PEFT warns about the skipped tensors
    assert ours[1][1].missing_keys == [k for k in theirs[1][1].missing_keys if ".lora_" in k]
    assert ours[1][1].missing_keys  # the skipped pairs are reported, as in PEFT
    torch.testing.assert_close(ours[2], theirs[2])


def test_merge_and_unload_progressbar() -> None:
    theirs, ours = both(llama_lora)
    same_weights(theirs, ours)
    expected = logits(theirs.eval())
    merged_theirs = theirs.merge_and_unload(progressbar=True)
    merged_ours = ours.merge_and_unload(progressbar=True, safe_merge=True)
    assert type(merged_ours) is type(merged_theirs)
    assert list(merged_ours.state_dict()) == list(merged_theirs.state_dict())
    torch.testing.assert_close(logits(merged_ours), logits(merged_theirs))
    torch.testing.assert_close(logits(merged_ours), expected)


# ---- training quality --------------------------------------------------------------------------------------------
def test_bf16_adapters_stay_float32_and_train_as_in_peft() -> None:
    def train(lib: ModuleType, autocast: bool = True) -> tuple[set[torch.dtype], float]:
        base = tiny_llama().to(torch.bfloat16).train()
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=LLAMA_TARGETS, r=8),
                                   autocast_adapter_dtype=autocast)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(10):
            ids = token_batch(seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = [(p.detach() != before[n]).float().mean().item()
                   for n, p in model.named_parameters() if "lora_A" in n]
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        return dtypes, min(changed)

    theirs, ours = both(train)
    assert ours[0] == theirs[0] == {torch.float32}
    assert ours[1] == theirs[1] == 1.0
    their_opt_out, our_opt_out = both(lambda lib: train(lib, autocast=False))
    assert our_opt_out[0] == their_opt_out[0] == {torch.bfloat16}


@pytest.mark.parametrize("autocast", [True, False])
def test_from_pretrained_autocast_adapter_dtype_over_a_bf16_base(tmp_path: Path, autocast: bool) -> None:
    llama_lora(peft).save_pretrained(tmp_path)

    def load(lib: ModuleType) -> tuple[set[torch.dtype], torch.Tensor]:
        model = lib.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path,
                                              autocast_adapter_dtype=autocast)
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}, logits(model)

    theirs, ours = both(load)
    assert ours[0] == theirs[0] == ({torch.float32} if autocast else {torch.bfloat16})
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-2, rtol=1.6e-2)  # bf16 logits: last-bit rounding


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


# ---- the model card -----------------------------------------------------------------------------------------------
def card_metadata(directory: Path) -> dict[str, Any]:
    text = (directory / "README.md").read_text()
    front = text.split("---")[1]
    import yaml
    return yaml.safe_load(front)


@pytest.mark.parametrize("name_or_path", ["", "some-org/tiny-llama"])
def test_model_card_metadata_matches_peft(tmp_path: Path, name_or_path: str) -> None:
    def save(lib: ModuleType) -> dict[str, Any]:
        base = tiny_llama()
        base.config._name_or_path = base.name_or_path = name_or_path
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=Q_V, task_type="CAUSAL_LM"))
        model.save_pretrained(tmp_path / lib.__name__)
        return card_metadata(tmp_path / lib.__name__)

    theirs, ours = both(save)
    assert ours["library_name"] == theirs["library_name"] == "peft"
    assert ours.get("pipeline_tag") == theirs.get("pipeline_tag")
    if name_or_path:
        assert ours["base_model"] == theirs["base_model"] == name_or_path
        assert ours["tags"] == theirs["tags"]
    else:  # PEFT writes `base_model: ''` and a tag `base_model:adapter:`, which the Hub rejects
        assert theirs["base_model"] == ""
        assert "base_model" not in ours
        assert ours["tags"] == [t for t in theirs["tags"] if t != "base_model:adapter:"]
    their_text = (tmp_path / "peft" / "README.md").read_text().split("---", 2)[2]
    our_text = (tmp_path / "peftlite" / "README.md").read_text().split("---", 2)[2]
    assert [h for h in our_text.splitlines() if h.startswith("#")] == \
           [h for h in their_text.splitlines() if h.startswith("#")]


def test_model_card_no_base_model_for_a_local_path(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    model = peftlite.get_peft_model(base, peftlite.LoraConfig(target_modules=Q_V, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    metadata = card_metadata(tmp_path / "adapter")
    assert "base_model" not in metadata and metadata["pipeline_tag"] == "text-generation"
