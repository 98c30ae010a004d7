"""Every bad input gets a clear exception naming the value, and leaves the model exactly as it was.

"Exactly as it was" is checked twice: the model's output on a fixed input is bit-identical, and
its fingerprint (module types by path, every parameter and buffer with requires_grad, the adapter
configs, the active adapter and the merge state) is unchanged.

Run: .venv/bin/pytest -q tests/test_errors.py
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import MLP, assert_same_fingerprint, model_fingerprint, tiny_gpt2, token_batch

from peftlite import LoraConfig, LoraModel, get_lora_model

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
    (dict(r=0), ["r=0", "from 1 to"]),
    (dict(r=-2), ["r=-2", "from 1 to"]),
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
    (dict(init_lora_weights="pissa_niter_"), ["init_lora_weights='pissa_niter_'", "'gaussian'"]),
    (dict(init_lora_weights=1), ["init_lora_weights=1", "True, False"]),
    (dict(target_modules=[]), ["target_modules=[]", "at least one"]),
    (dict(target_modules=["lin0", ""]), ["''", "module name"]),
    (dict(target_modules=7), ["target_modules=7", "list of module names"]),
    (dict(target_modules={"lin0", 3}), ["3", "module name"]),
    (dict(target_modules="lin[0"), ["'lin[0'", "regex"]),
    (dict(exclude_modules="(?i)x|(?i)y"), ["'(?i)x|(?i)y'", "regex"]),
    (dict(rank_pattern={"lin0": 0}), ["rank_pattern['lin0']=0", "from 1 to"]),
    (dict(rank_pattern={"lin0": 2.5}), ["rank_pattern['lin0']=2.5", "from 1 to"]),
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
    (dict(task_type=3), ["task_type=3", "CAUSAL_LM"]),
]


def case_ids(cases) -> list[str]:
    """Stable test ids (a set's repr changes order between processes, which breaks pytest-xdist)."""
    return [f"{i}-{words[0]}" for i, (_, words) in enumerate(cases)]


@pytest.mark.parametrize("kwargs,words", BAD_CONFIGS, ids=case_ids(BAD_CONFIGS))
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
    (dict(target_modules=["relu"]), ["'relu'", "ReLU", "cannot take LoRA"]),
    (dict(target_modules=["lin0"], layers_to_transform=[0]), ["layers_to_transform=[0]", "matched no module"]),
    (dict(target_modules=["head"], modules_to_save=["head"]), ["['head']", "modules_to_save"]),
    # lin0 already carries LoRA: it cannot also be trained in full
    (dict(target_modules=["lin1"], modules_to_save=["lin0"]), ["'lin0'", "already has LoRA"]),
    # enable_lora needs an output size it divides: head has 2 outputs
    (dict(target_modules=["head"], enable_lora=[True, False, True]), ["enable_lora=[True, False, True]", "size 2"]),
]


@pytest.mark.parametrize("kwargs,words", BAD_FOR_THIS_MODEL, ids=case_ids(BAD_FOR_THIS_MODEL))
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


def test_a_model_that_already_has_lora_is_not_wrapped_again(tmp_path):
    """Its layers answer to the first LoraModel's switchboard; a second wrapper's set_adapter would not reach them."""
    first = two_adapter_mlp()
    first.save_pretrained(tmp_path)
    for model in (first, first.base_model):
        for call in (lambda m: get_lora_model(m, LoraConfig(target_modules=["head"])),
                     lambda m: LoraModel.from_pretrained(m, str(tmp_path))):
            assert_fails_unchanged(model, call, ValueError, "'", "already has LoRA layers", "unload()")
    get_lora_model(first.unload(), LoraConfig(target_modules=["head"]))  # once unloaded it is a plain model again
    assert_fails_unchanged(MLP(), lambda m: get_lora_model("mlp", LoraConfig()), ValueError, "str", "nn.Module")


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
    message = assert_fails_unchanged(two_adapter_mlp(), lambda m: UNKNOWN_NAME_CALLS[method](m, name), ValueError,
                                     repr(name), "'default'", "'other'")
    assert "unknown adapter" in message


@pytest.mark.parametrize("name", [["other"], 3, None, ("other",)], ids=repr)
def test_adapter_name_of_the_wrong_type_is_a_value_error(name):
    """A list names several adapters for set_adapter (as PEFT's); delete_adapter takes one name."""
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.delete_adapter(name), ValueError, repr(name))


@pytest.mark.parametrize("names,words", [
    (5, ["adapter_names=5", "list of adapter names"]),
    ({"other": 1}, ["adapter_names={'other': 1}", "list of adapter names"]),
    (["other", "other"], ["adapter_names=['other', 'other']", "at most once"]),
], ids=repr)
def test_merge_adapter_names_of_the_wrong_shape(names, words):
    for call in (lambda m: m.merge_adapter(names), lambda m: m.merge_and_unload(adapter_names=names)):
        assert_fails_unchanged(two_adapter_mlp(), call, ValueError, *words)


def test_merge_with_no_active_adapter():
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.delete_adapter("default")
    assert_fails_unchanged(model, lambda m: m.merge_adapter(), ValueError, "no adapter is active")


# ---- merging -----------------------------------------------------------------------------------
def test_merging_an_already_merged_adapter_warns_and_changes_nothing():
    """As PEFT: merging a merged adapter again is skipped with a warning, not an error."""
    model = two_adapter_mlp()
    model.merge_adapter(["default"])
    layer = model.base_model.lin0
    for call in (lambda: model.merge_adapter(), lambda: layer.merge(adapter_names=["default"])):
        before = model_fingerprint(model)
        with pytest.warns(UserWarning, match=r"\['default'\] are already merged"):
            call()
        assert_same_fingerprint(before, model_fingerprint(model))


def test_modules_to_save_that_match_nothing_are_skipped_with_a_warning():
    """PEFT skips them (its SEQ_CLS default lists both "classifier" and "score"); peftlite says so."""
    model = two_adapter_mlp()
    with pytest.warns(UserWarning, match="'classifier'.*match no module"):
        model.add_adapter("new", LoraConfig(target_modules=["lin1"], modules_to_save=["classifier"]))
    assert "new" in model.peft_config and not model.saved_modules()


def test_merge_and_unload_of_a_merged_adapter_merges_it_once():
    """The already merged adapter is not added a second time: output equals the unmerged LoRA model's."""
    model = two_adapter_mlp()
    expected = model(X)
    model.merge_adapter()
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(X), expected, rtol=1e-5, atol=1e-6)


# ---- mixed batches: adapter_names in forward and generate ---------------------------------------
BAD_ADAPTER_NAMES = [
    (["default"] * 3, ValueError, ["3 entries", "4 samples"]),
    (["default"] * 5, ValueError, ["5 entries", "4 samples"]),
    ([], ValueError, ["empty"]),
    ("default", ValueError, ["adapter_names='default'", "list"]),
    ({"default": 1}, ValueError, ["adapter_names={'default': 1}", "list"]),
    (["default", None, "other", "other"], ValueError, ["None", "string"]),
    (["default", "missing", "other", "other"], ValueError, ["'missing'", "'default'", "'__base__'"]),
    (["default", "Default", "other", "other"], ValueError, ["'Default'"]),
]


@pytest.mark.parametrize("names,error,words", BAD_ADAPTER_NAMES, ids=[repr(c[0]) for c in BAD_ADAPTER_NAMES])
def test_bad_adapter_names_in_forward_change_nothing(names, error, words):
    model = two_adapter_mlp().eval()
    with torch.no_grad():
        assert_fails_unchanged(model, lambda m: m(X, adapter_names=names), error, *words)


def test_adapter_names_refused_in_training_mode_or_while_merged():
    model = two_adapter_mlp().train()
    names = ["default", "other", "__base__", "other"]
    assert_fails_unchanged(model, lambda m: m(X, adapter_names=names), ValueError, "training mode")
    model.eval()
    model.merge_adapter()
    with torch.no_grad():
        assert_fails_unchanged(model, lambda m: m(X, adapter_names=names), ValueError, "merged")


def test_bad_adapter_names_in_generate():
    model = get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], init_lora_weights=False)).eval()
    ids = token_batch(batch=2, length=4)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=1)
    for names, error, word in ((["default"], ValueError, "2 samples"), (["default", "x"], ValueError, "'x'")):
        assert_fails_unchanged(model, lambda m: m.generate(ids, adapter_names=names, **kwargs), error, word,
                               inputs=(ids,))


# ---- adapter files -------------------------------------------------------------------------------
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
A_KEY = "base_model.model.lin1.lora_A.weight"
B_KEY = "base_model.model.lin1.lora_B.weight"


@pytest.fixture
def saved_dir(tmp_path):
    """A valid peftlite adapter for MLP (lin1, r=4) in tmp_path/adapter."""
    model = get_lora_model(MLP(seed=5), LoraConfig(r=4, target_modules=["lin1"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def set_config(directory, **changes):
    data = json.loads((directory / CONFIG).read_text())
    data.update(changes)
    (directory / CONFIG).write_text(json.dumps(data))


def set_weights(directory, change):
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS)


def safetensors_header(directory) -> tuple[dict, bytes]:
    data = (directory / WEIGHTS).read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def lying_offsets(directory):
    header, body = safetensors_header(directory)
    header[A_KEY]["data_offsets"] = [0, 10 ** 12]
    raw = json.dumps(header).encode()
    (directory / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + body)


# (how to spoil the adapter directory d, expected error, words the message must contain)
BAD_FILES = {
    "config: deeply nested JSON": (lambda d: (d / CONFIG).write_text("[" * 100_000 + "]" * 100_000),
                                   ValueError, ["not valid JSON"]),
    "config: empty file": (lambda d: (d / CONFIG).write_text(""), ValueError, ["not valid JSON"]),
    "config: binary junk": (lambda d: (d / CONFIG).write_bytes(b"\xff\xfe\x00junk"), ValueError, ["not valid JSON"]),
    "config: a string": (lambda d: (d / CONFIG).write_text('"LORA"'), ValueError, ["expected a JSON object"]),
    "config: null": (lambda d: (d / CONFIG).write_text("null"), ValueError, ["expected a JSON object"]),
    "config: NaN alpha": (lambda d: set_config(d, lora_alpha=math.nan), ValueError, ["lora_alpha=nan"]),
    "config: r as a string": (lambda d: set_config(d, r="4"), ValueError, ["r='4'"]),
    "config: target_modules junk": (lambda d: set_config(d, target_modules=7), ValueError, ["target_modules=7"]),
    "config: another peft_type": (lambda d: set_config(d, peft_type="LOHA"), ValueError, ["'LOHA'", "'LORA'"]),
    "config: a directory": (lambda d: (d / CONFIG).unlink() or (d / CONFIG).mkdir(), FileNotFoundError, [CONFIG]),
    "weights: empty file": (lambda d: (d / WEIGHTS).write_bytes(b""), ValueError, ["not a readable safetensors"]),
    "weights: header size 2**62": (lambda d: (d / WEIGHTS).write_bytes((2 ** 62).to_bytes(8, "little") + b"{}"),
                                   ValueError, ["not a readable safetensors"]),
    "weights: header not JSON": (lambda d: (d / WEIGHTS).write_bytes((9).to_bytes(8, "little") + b"not json!"),
                                 ValueError, ["not a readable safetensors"]),
    "weights: offsets past the end": (lying_offsets, ValueError, ["not a readable safetensors"]),
    "weights: only lora_A": (lambda d: set_weights(d, lambda t: t.pop(B_KEY)), ValueError, ["'lin1'", "lora_B"]),
    "weights: rank 8 for r=4": (lambda d: set_weights(d, lambda t: t.update({A_KEY: torch.zeros(8, 20),
                                                                              B_KEY: torch.zeros(20, 8)})),
                                ValueError, ["(8, 20)", "(4, 20)", "r=4"]),
    "weights: wrong in_features": (lambda d: set_weights(d, lambda t: t.update({A_KEY: torch.zeros(4, 21)})),
                                   ValueError, ["(4, 21)", "(4, 20)"]),
    "weights: a module the model lacks": (lambda d: set_weights(d, lambda t: t.update(
        {"base_model.model.decoder.lora_A.weight": torch.zeros(4, 20)})), ValueError, ["decoder"]),
    "weights: on a ReLU": (lambda d: set_weights(d, lambda t: t.update(
        {"base_model.model.relu.lora_A.weight": torch.zeros(4, 20)})), ValueError, ["relu"]),
    "weights: no LoRA tensors": (lambda d: save_file({}, d / WEIGHTS), ValueError, ["no LoRA weights"]),
    "weights: only a base bias": (lambda d: save_file({"base_model.model.lin1.bias": torch.zeros(20)}, d / WEIGHTS),
                                  ValueError, ["no LoRA weights"]),
    "weights: missing": (lambda d: (d / WEIGHTS).unlink(), FileNotFoundError, [WEIGHTS, "adapter_model.bin"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_file_is_named_and_changes_nothing(saved_dir, case):
    spoil, error, words = BAD_FILES[case]
    spoil(saved_dir)
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.load_adapter(str(saved_dir), "new"), error, *words)
    assert_fails_unchanged(MLP(), lambda m: LoraModel.from_pretrained(m, str(saved_dir)), error, *words)


def test_missing_directory_and_repo(tmp_path):
    missing = tmp_path / "no-such-adapter"
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.load_adapter(str(missing), "new"), FileNotFoundError,
                           "no-such-adapter")
    for repo in ("someone/no-such-adapter", "no-such-adapter"):
        assert_fails_unchanged(
            MLP(), lambda m: LoraModel.from_pretrained(m, repo, local_files_only=True, cache_dir=str(tmp_path)),
            FileNotFoundError, repr(repo))


def test_a_stateless_module_to_save_loads(saved_dir):
    """modules_to_save naming a module with no parameters (no keys in the file) once raised ValueError mid-load."""
    set_config(saved_dir, modules_to_save=["relu"])
    model = LoraModel.from_pretrained(MLP(), str(saved_dir))
    assert set(model.peft_config) == {"default"}
    assert type(model.base_model.relu).__name__ == "ModulesToSave"


def peft_adapter(tmp_path, kind: str):
    """A real adapter of another PEFT method, saved by peft itself."""
    if kind == "prefix tuning":
        model = peft.get_peft_model(tiny_gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    else:
        config = {"IA3": lambda: peft.IA3Config(target_modules=["lin1"], feedforward_modules=[]),
                  "AdaLoRA": lambda: peft.AdaLoraConfig(target_modules=["lin1"], total_step=10, init_r=4),
                  "LoHa": lambda: peft.LoHaConfig(target_modules=["lin1"], r=4)}[kind]()
        model = peft.get_peft_model(MLP(), config)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind,peft_type", [("IA3", "IA3"), ("AdaLoRA", "ADALORA"), ("LoHa", "LOHA"),
                                            ("prefix tuning", "PREFIX_TUNING")])
def test_an_adapter_of_another_peft_method_is_refused(tmp_path, kind, peft_type):
    """AdaLoRA is the sly one: its file has lora_A/lora_B keys, but its math differs."""
    directory = peft_adapter(tmp_path, kind)
    model = (get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"])) if kind == "prefix tuning"
             else two_adapter_mlp())
    inputs = (token_batch(),) if kind == "prefix tuning" else (X,)
    assert_fails_unchanged(model, lambda m: m.load_adapter(str(directory), "new"), ValueError,
                           f"peft_type={peft_type!r}", "'LORA'", inputs=inputs)


class Payload:
    """Unpickling this opens (creates) the marker file: a loader that unpickles runs our code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt", ["torch zip", "torch legacy", "raw pickle"])
def test_a_malicious_pickle_is_never_executed(saved_dir, tmp_path, fmt):
    marker = tmp_path / "pwned"
    poisoned = {A_KEY: Payload(marker), B_KEY: torch.zeros(20, 4)}
    path = saved_dir / "adapter_model.bin"
    if fmt == "raw pickle":
        path.write_bytes(pickle.dumps(poisoned))
    else:
        torch.save(poisoned, path, _use_new_zipfile_serialization=fmt == "torch zip")
    # With safetensors present the .bin is never opened; without, it is refused by the weights-only loader.
    LoraModel.from_pretrained(MLP(), str(saved_dir))
    assert not marker.exists()
    (saved_dir / WEIGHTS).unlink()
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.load_adapter(str(saved_dir), "new"), ValueError,
                           "adapter_model.bin", "weights-only")
    assert not marker.exists(), "unpickling ran code from the adapter file"
    # The payload is real: a plain unpickle would have run it.
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


def test_load_adapter_checks_the_name_before_reading_anything(tmp_path):
    """A bad or taken name is reported as such, even for a path that does not exist."""
    missing = str(tmp_path / "missing")
    for name, word in (("a/b", "letters, digits"), ("", "letters, digits"), ("__base__", "reserved"),
                       ("other", "already exists")):
        assert_fails_unchanged(two_adapter_mlp(), lambda m: m.load_adapter(missing, name), ValueError, repr(name), word)


def test_unknown_adapter_names_when_saving_pushing_or_hotswapping(saved_dir, tmp_path):
    out = tmp_path / "out"
    calls = {
        "save_pretrained": lambda m: m.save_pretrained(out, selected_adapters=["default", "missing"]),
        "save_pretrained(str)": lambda m: m.save_pretrained(out, selected_adapters="missing"),
        "push_to_hub": lambda m: m.push_to_hub("someone/repo", adapter_name="missing"),
        "hotswap_adapter": lambda m: m.hotswap_adapter(str(saved_dir), "missing"),
    }
    for call in calls.values():
        assert_fails_unchanged(two_adapter_mlp(), call, ValueError, "'missing'", "'default'")
    assert_fails_unchanged(two_adapter_mlp(), lambda m: m.save_pretrained(out, selected_adapters=5), ValueError,
                           "selected_adapters=5")
    assert not out.exists()


# ---- failures past validation --------------------------------------------------------------------
def fail_on_call(number: int, real):
    """A stand-in for `real` that raises like an out-of-memory allocation on its `number`-th call."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise RuntimeError("simulated: out of memory allocating lora_A")
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("where,number", [("LoraLayer.add_adapter", 3), ("ModulesToSave.add_adapter", 1)])
def test_an_allocation_failure_midway_is_undone(monkeypatch, where, number):
    """Validation cannot foresee running out of memory; the partial change is taken back instead."""
    import peftlite.layers as layers
    cls = getattr(layers, where.split(".")[0])
    real = cls.add_adapter
    config = LoraConfig(target_modules=["lin0", "lin1", "head"], modules_to_save=["relu"])
    # lin0 and lin1 already carry LoRA; head and relu get new wrappers.
    model = two_adapter_mlp()
    monkeypatch.setattr(cls, "add_adapter", fail_on_call(number, real))
    assert_fails_unchanged(model, lambda m: m.add_adapter("new", config), RuntimeError, "out of memory")
    # The first adapter too, training every bias: the frozen model's requires_grad flags come back.
    monkeypatch.setattr(cls, "add_adapter", fail_on_call(number, real))
    config = LoraConfig(target_modules=["lin0", "lin1", "head"], bias="all", modules_to_save=["relu"])
    assert_fails_unchanged(MLP(), lambda m: get_lora_model(m, config), RuntimeError, "out of memory")


def test_add_weighted_adapter_bad_numbers_change_nothing():
    """Weights and svd_rank past what floats and shapes can hold are ValueErrors (were OverflowError/TypeError)."""
    model = get_lora_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    calls = [
        (lambda m: m.add_weighted_adapter(["default"], [10 ** 400], "mix"), ["weights=[1000"]),
        (lambda m: m.add_weighted_adapter(["default", "other"], [1e308, 1e308], "mix", "cat"), ["1e+308", "Inf"]),
        (lambda m: m.add_weighted_adapter(["default", "other"], [1, 1], "mix", "svd", 10 ** 20), ["svd_rank=1000"]),
    ]
    for call, words in calls:
        assert_fails_unchanged(model, call, ValueError, *words)
    assert_fails_unchanged(model, lambda m: m.add_weighted_adapter(["default", "missing"], [1, 1], "mix", "cat"),
                           ValueError, "'missing'")
