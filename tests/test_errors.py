"""Every bad input gets a clear exception naming the value, and leaves the model exactly as it was.

"Exactly as it was" is checked twice: the model's output on a fixed input is bit-identical, and
its fingerprint (module types by path, every parameter and buffer with requires_grad, the adapter
configs, the active adapter and the merge state) is unchanged.

Run: .venv/bin/pytest -q tests/test_errors.py
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

from peftlite import LoraConfig, get_lora_model
from tiny_models import MLP, assert_same_fingerprint, model_fingerprint, tiny_gpt2, token_batch

X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


def two_adapter_mlp():
    """An MLP with adapters "default" (lin0, lin1; active) and "other" (lin0), both non-zero."""
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False))
    return model


def assert_fails_unchanged(model, call, error: type[Exception], *words: str, inputs=(X,)):
    """`call(model)` raises `error` whose message contains each of `words`, and the model is as before."""
    before, output = model_fingerprint(model), logits(model(*inputs))
    with pytest.raises(error) as caught:
        call(model)
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert_same_fingerprint(before, model_fingerprint(model))
    assert torch.equal(logits(model(*inputs)), output)
    return message


def logits(output) -> torch.Tensor:
    return getattr(output, "logits", output)


# ---- config values, applied with add_adapter --------------------------------------------------
# (LoraConfig kwargs, text the message must contain: the offending value and what was expected)
BAD_CONFIGS = [
    (dict(r=0), ["r=0", ">= 1"]),
    (dict(r=-2), ["r=-2", ">= 1"]),
    (dict(r=1.5), ["r=1.5", "integer"]),
    (dict(r="8"), ["r='8'", "integer"]),
    (dict(r=True), ["r=True", "integer"]),
    (dict(lora_alpha=0), ["lora_alpha=0", "> 0"]),
    (dict(lora_alpha=-1.0), ["lora_alpha=-1.0", "> 0"]),
    (dict(lora_alpha=math.inf), ["lora_alpha=inf", "> 0"]),
    (dict(lora_alpha=10 ** 400), ["lora_alpha=1000", "> 0"]),
    (dict(lora_alpha=3.5e38), ["lora_alpha=3.5e+38", "<= 3.4e+38"]),  # its scaling overflowed float32 kernels
    (dict(lora_dropout=1.0), ["lora_dropout=1.0", "[0, 1)"]),
    (dict(lora_dropout=-0.1), ["lora_dropout=-0.1", "[0, 1)"]),
    (dict(bias="some"), ["bias='some'", "'lora_only'"]),
    (dict(init_lora_weights="pissa"), ["init_lora_weights='pissa'", "'gaussian'"]),
    (dict(init_lora_weights=1), ["init_lora_weights=1", "True, False"]),
    (dict(target_modules=[]), ["target_modules=[]", "at least one"]),
    (dict(target_modules=["lin0", ""]), ["''", "module name"]),
    (dict(target_modules=7), ["target_modules=7", "list of module names"]),
    (dict(target_modules={"lin0", 3}), ["3", "module name"]),
    (dict(target_modules="lin[0"), ["'lin[0'", "regex"]),
    (dict(exclude_modules="(?i)x|(?i)y"), ["'(?i)x|(?i)y'", "regex"]),
    (dict(rank_pattern={"lin0": 0}), ["rank_pattern['lin0']=0", ">= 1"]),
    (dict(rank_pattern={"lin0": 2.5}), ["rank_pattern['lin0']=2.5", ">= 1"]),
    (dict(rank_pattern={"(?i)lin0": 2}), ["'(?i)lin0'", "regex"]),
    (dict(rank_pattern={"lin(": 2}), ["'lin('", "regex"]),
    (dict(alpha_pattern={"lin0": -1}), ["alpha_pattern['lin0']=-1", "> 0"]),
    (dict(alpha_pattern={"lin0": 0.0}), ["alpha_pattern['lin0']=0.0", "> 0"]),
    (dict(alpha_pattern={"lin0": 1e39}), ["alpha_pattern['lin0']=1e+39", "<= 3.4e+38"]),
    (dict(layers_to_transform=[-1]), ["layers_to_transform=[-1]", "non-negative"]),
    (dict(enable_lora=[]), ["enable_lora=[]", "at least one True"]),
    (dict(enable_lora=[False, False]), ["enable_lora=[False, False]", "at least one True"]),
    (dict(modules_to_save=5), ["modules_to_save=5", "list of module names"]),
    (dict(modules_to_save="head"), ["modules_to_save='head'", "list of module names"]),
    (dict(fan_in_fan_out="yes"), ["fan_in_fan_out='yes'", "True or False"]),
    (dict(task_type=3), ["task_type=3", "string"]),
]


@pytest.mark.parametrize("kwargs,words", BAD_CONFIGS, ids=[repr(k) for k, _ in BAD_CONFIGS])
def test_bad_config_value_is_named_and_changes_nothing(kwargs, words):
    kwargs = {"target_modules": ["lin1"], **kwargs}
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.add_adapter("new", LoraConfig(**kwargs)),
                           ValueError, *words)


def test_bad_config_value_in_a_dict_is_named():
    with pytest.raises(ValueError, match=r"r=0 is invalid"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 0, "target_modules": ["q"]})
    with pytest.raises(ValueError, match="expected a JSON object"):
        LoraConfig.from_dict(["r", 8])


# Errors that only the model can find: the config is valid on its own.
BAD_FOR_THIS_MODEL = [
    (dict(target_modules=["nope"]), ["['nope']", "matched no module", "lin0"]),
    (dict(target_modules=r"lin\d+x"), ["'lin\\\\d+x'", "matched no module"]),
    (dict(target_modules=["lin0"], exclude_modules=["lin0"]), ["exclude_modules=['lin0']", "matched no module"]),
    (dict(target_modules=["relu"]), ["['relu']", "matched no module"]),
    (dict(target_modules=["lin0"], layers_to_transform=[0]), ["layers_to_transform=[0]", "matched no module"]),
    (dict(target_modules=["lin1"], modules_to_save=["classifier"]), ["['classifier']", "match no module"]),
    (dict(target_modules=["head"], modules_to_save=["head"]), ["['head']", "modules_to_save"]),
    # lin0 already carries LoRA: it cannot also be trained in full
    (dict(target_modules=["lin1"], modules_to_save=["lin0"]), ["'lin0'", "already has LoRA"]),
    # enable_lora needs an output size it divides: head has 2 outputs
    (dict(target_modules=["head"], enable_lora=[True, False, True]), ["enable_lora=[True, False, True]", "size 2"]),
]


@pytest.mark.parametrize("kwargs,words", BAD_FOR_THIS_MODEL, ids=[repr(k) for k, _ in BAD_FOR_THIS_MODEL])
def test_config_that_does_not_fit_the_model_changes_nothing(kwargs, words):
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.add_adapter("new", LoraConfig(**kwargs)),
                           ValueError, *words)


def test_fused_layer_keeps_its_slices():
    """A second adapter on GPT-2's fused c_attn must use the first one's enable_lora."""
    model = get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], enable_lora=[True, False, True]))
    ids = token_batch()
    assert_fails_unchanged(
        model, lambda m: m.add_adapter("other", LoraConfig(target_modules=["c_attn"], enable_lora=[True, True, True])),
        ValueError, "enable_lora=[True, False, True]", "[True, True, True]", inputs=(ids,))
    assert_fails_unchanged(
        model, lambda m: m.add_adapter("plain", LoraConfig(target_modules=["c_attn"])),
        ValueError, "enable_lora", inputs=(ids,))
    # 96 outputs cannot be cut into 5 equal slices
    with pytest.raises(ValueError, match=r"enable_lora=\[True, False, True, False, True\].*96"):
        get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], enable_lora=[True, False, True, False, True]))


def test_other_peft_method_config_is_refused():
    for config in (peft.IA3Config(target_modules=["lin0"], feedforward_modules=[]),
                   peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)):
        data = json.loads(json.dumps(config.to_dict(), default=list))  # as adapter_config.json holds it
        with pytest.raises(ValueError, match=rf"peft_type={data['peft_type']!r}.*'LORA'"):
            LoraConfig.from_dict(data)


# ---- adapter names -------------------------------------------------------------------------------
BAD_NAMES = ["", "a/b", "a.b", "a b", "../x", "x\n", "é", 5, None, ("a",)]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_adapter_name_is_named_and_changes_nothing(name):
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.add_adapter(name, LoraConfig(target_modules=["lin1"])),
                           ValueError, repr(name), "letters, digits")


@pytest.mark.parametrize("name", ["", "a/b", "a.b", "a b"], ids=repr)
def test_bad_adapter_name_when_wrapping(name):
    with pytest.raises(ValueError, match="letters, digits"):
        get_lora_model(MLP(), LoraConfig(target_modules=["lin0"]), adapter_name=name)


def test_reserved_and_clashing_adapter_names():
    model = two_adapter_mlp()
    assert_fails_unchanged(model, lambda m: m.add_adapter("__base__", LoraConfig(target_modules=["lin1"])),
                           ValueError, "'__base__'", "reserved")
    for name in ("default", "other"):
        assert_fails_unchanged(model, lambda m: m.add_adapter(name, LoraConfig(target_modules=["lin1"])),
                               ValueError, repr(name), "already exists")


def test_config_that_is_not_a_lora_config():
    for config in ({"r": 4}, peft.LoraConfig(target_modules=["lin1"]), None):
        assert_fails_unchanged(two_adapter_mlp(), lambda m: m.add_adapter("new", config), ValueError,
                               "expected a LoraConfig")


# ---- unknown adapter names, in every method that takes one ---------------------------------------
UNKNOWN_NAME_CALLS = {
    "set_adapter": lambda m, n: m.set_adapter(n),
    "delete_adapter": lambda m, n: m.delete_adapter(n),
    "merge_adapter": lambda m, n: m.merge_adapter([n]),
    "merge_adapter(str)": lambda m, n: m.merge_adapter(n),
    "merge_and_unload": lambda m, n: m.merge_and_unload([n]),
    "merge_and_unload(some known)": lambda m, n: m.merge_and_unload(["default", n]),
}


@pytest.mark.parametrize("method", UNKNOWN_NAME_CALLS)
@pytest.mark.parametrize("name", ["missing", "defaul", "__base__", ""])
def test_unknown_adapter_name_is_a_key_error_that_changes_nothing(method, name):
    message = assert_fails_unchanged(two_adapter_mlp(), lambda m: UNKNOWN_NAME_CALLS[method](m, name), KeyError,
                                     repr(name), "'default'", "'other'")
    assert "unknown adapter" in message


@pytest.mark.parametrize("name", [["other"], 3, None, ("other",)], ids=repr)
def test_adapter_name_of_the_wrong_type_is_a_key_error(name):
    for call in (lambda m: m.set_adapter(name), lambda m: m.delete_adapter(name)):
        assert_fails_unchanged(two_adapter_mlp(), call, KeyError, repr(name))


@pytest.mark.parametrize("names,words", [
    (5, ["adapter_names=5", "list of adapter names"]),
    ({"other": 1}, ["adapter_names={'other': 1}", "list of adapter names"]),
    (["other", "other"], ["adapter_names=['other', 'other']", "at most once"]),
], ids=repr)
def test_merge_adapter_names_of_the_wrong_shape(names, words):
    for call in (lambda m: m.merge_adapter(names), lambda m: m.merge_and_unload(names)):
        assert_fails_unchanged(two_adapter_mlp(), call, ValueError, *words)


def test_merge_with_no_active_adapter():
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.delete_adapter("default")
    assert_fails_unchanged(model, lambda m: m.merge_adapter(), ValueError, "no adapter is active")


# ---- merging -----------------------------------------------------------------------------------
def test_merging_an_already_merged_adapter_changes_nothing():
    model = two_adapter_mlp()
    model.merge_adapter(["default"])
    assert_fails_unchanged(model, lambda m: m.merge_adapter(), ValueError, "['default']", "already merged")
    assert_fails_unchanged(model, lambda m: m.merge_adapter(["other", "default"]), ValueError,
                           "['default']", "already merged")
    layer = model.base_model.lin0
    assert_fails_unchanged(model, lambda m: layer.merge("default"), ValueError, "'default'", "already merged")


def test_merge_and_unload_of_a_merged_adapter_merges_it_once():
    """The already merged adapter is not added a second time: output equals the unmerged LoRA model's."""
    model = two_adapter_mlp()
    expected = model(X)
    model.merge_adapter()
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(X), expected, rtol=1e-5, atol=1e-6)
