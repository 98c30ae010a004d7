"""Property-based fuzzing of configs, adapter names and mixed-batch adapter_names (hypothesis).

The property, for any input: either it works, or it raises ValueError/ValueError and the model is
exactly as it was (fingerprint and output bit-identical). Never another exception type, never a
half-changed model. When adding an adapter works, the new adapter starts as a no-op (B = 0, or
A = 0 for embeddings) unless init_lora_weights=False, so its output must equal the base's.

Inputs mix valid and invalid values of every LoraConfig field. The example counts are small
and derandomized so CI runs the same cases in a few seconds; raise FUZZ_EXAMPLES to search harder:
    FUZZ_EXAMPLES=3000 .venv/bin/pytest -q tests/test_fuzz.py

Run: .venv/bin/pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_models import MLP, ConvNet, assert_same_fingerprint, model_fingerprint

from peftlite import LoraConfig, get_lora_model

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MODULE_NAMES = ["lin0", "lin1", "head", "relu", "emb", "conv", "nope", "lin", "", "0"]
REGEXES = [r"lin\d", ".*", "(", "head|emb", "(?i)x", "lin[", "conv|lin0", "a{2,1}"]
JUNK = st.sampled_from([None, "", "x", 0, -1, 1.5, float("nan"), [], {}, ("a",), b"lin0"])

names = st.sampled_from(MODULE_NAMES)
targets = st.one_of(st.none(), st.just("all-linear"), st.sampled_from(REGEXES), st.text(max_size=4),
                    st.lists(names, max_size=3), st.sets(names, max_size=2), JUNK)
patterns = st.dictionaries(st.one_of(names, st.sampled_from(REGEXES)),
                           st.one_of(st.integers(-1, 6), st.floats(-2, 8), JUNK), max_size=2)
flags = st.one_of(st.booleans(), JUNK)

FIELDS = {
    "r": st.one_of(st.integers(-2, 6), st.floats(-1, 6), st.booleans(), JUNK),
    "lora_alpha": st.one_of(st.integers(-2, 64), st.floats(allow_nan=True, allow_infinity=True), JUNK),
    "lora_dropout": st.one_of(st.floats(-0.5, 1.5), st.integers(-1, 2), JUNK),
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only", "None", "x"]), JUNK),
    "init_lora_weights": st.one_of(st.sampled_from([True, False, "gaussian", "pissa", "True"]), JUNK),
    "target_modules": targets,
    "exclude_modules": targets,
    "rank_pattern": st.one_of(patterns, JUNK),
    "alpha_pattern": st.one_of(patterns, JUNK),
    "layers_to_transform": st.one_of(st.none(), st.integers(-1, 2), st.lists(st.integers(-1, 2), max_size=2), JUNK),
    "enable_lora": st.one_of(st.none(), st.lists(st.booleans(), max_size=4), JUNK),
    "modules_to_save": st.one_of(st.none(), st.lists(names, max_size=2), JUNK),
    "use_rslora": flags,
    "fan_in_fan_out": flags,
    "merge_weights": flags,
    "inference_mode": flags,
    "task_type": st.one_of(st.none(), st.sampled_from(["SEQ_CLS", "CAUSAL_LM"]), JUNK),
}
config_kwargs = st.fixed_dictionaries({}, optional=FIELDS)
adapter_names = st.one_of(st.sampled_from(["default", "new", "__base__", "a-1_B", "a.b", "a/b", "a b", ""]),
                          st.text(max_size=6), JUNK)
MODELS = {"mlp": MLP, "convnet": ConvNet}



def inputs_for(model_kind: str):
    gen = torch.Generator().manual_seed(1)
    if model_kind == "mlp":
        return (torch.randn(3, 10, generator=gen),)
    return torch.randn(3, 3, 4, 4, generator=gen), torch.randint(0, 16, (3, 5), generator=gen)


def try_config(kwargs: dict) -> LoraConfig | None:
    """The config, or None if LoraConfig refused it with a ValueError (any other exception fails the test)."""
    try:
        return LoraConfig(**kwargs)
    except ValueError:
        return None


def check_works_or_changes_nothing(model, call, inputs) -> bool:
    """Run `call`; True if it worked, False if it raised ValueError/ValueError leaving the model as it was."""
    before, output = model_fingerprint(model), model(*inputs)
    try:
        call()
    except ValueError as err:
        assert str(err), "an error without a message"
        assert_same_fingerprint(before, model_fingerprint(model))
        assert torch.equal(model(*inputs), output)
        return False
    return True


@FUZZ
@given(model_kind=st.sampled_from(sorted(MODELS)), kwargs=config_kwargs, name=adapter_names)
def test_first_adapter_works_or_leaves_the_model_alone(model_kind, kwargs, name):
    base = MODELS[model_kind]()
    config = try_config(kwargs)
    inputs = inputs_for(model_kind)
    with torch.no_grad():
        expected = base(*inputs)
    wrapped = []
    worked = check_works_or_changes_nothing(base, lambda: wrapped.append(get_lora_model(base, config, name)),
                                            inputs)
    if worked:
        model = wrapped[0]
        assert model.active_adapter == name and set(model.peft_config) == {name}
        check_new_adapter_runs(model, name, config, inputs, expected)


@FUZZ
@given(model_kind=st.sampled_from(sorted(MODELS)), kwargs=config_kwargs, name=adapter_names)
def test_another_adapter_works_or_leaves_the_model_alone(model_kind, kwargs, name):
    first = ["lin1"] if model_kind == "mlp" else ["conv", "emb"]
    model = get_lora_model(MODELS[model_kind](), LoraConfig(target_modules=first, init_lora_weights=False))
    inputs = inputs_for(model_kind)
    with torch.no_grad(), model.disable_adapter():
        expected = model(*inputs)
    config = try_config(kwargs)
    if check_works_or_changes_nothing(model, lambda: model.add_adapter(name, config), inputs):
        assert set(model.peft_config) == {"default", name} and model.active_adapter == "default"
        check_new_adapter_runs(model, name, config, inputs, expected)
        model.delete_adapter(name)
        assert set(model.peft_config) == {"default"}


def check_new_adapter_runs(model, name, config, inputs, base_output):
    """A freshly added adapter runs; unless init is random its output is the base model's."""
    model.set_adapter(name)
    model.eval()  # no dropout; merge_weights=True merges here
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == base_output.shape
    if config.init_lora_weights is not False:
        torch.testing.assert_close(out, base_output, rtol=1e-5, atol=1e-5)
    model.train()  # merge_weights=True unmerges here


@pytest.fixture(scope="module")
def mixed_model():
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False,
                                      modules_to_save=["head"]))
    with torch.no_grad():  # b's copy of the head differs from the original
        model.base_model.head.modules_to_save["b"].weight.mul_(-2)
    model.eval()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        references = {"a": model(x)}
        model.set_adapter("b")
        references["b"] = model(x)
        with model.disable_adapter():
            references["__base__"] = model(x)
        model.set_adapter("a")
    return model, x, references


@FUZZ
@given(names=st.one_of(st.lists(st.one_of(st.sampled_from(["a", "b", "__base__", "c", "A", ""]), JUNK),
                                max_size=6),
                       st.tuples(*[st.sampled_from(["a", "b", "__base__"])] * 4), st.text(max_size=4), JUNK))
def test_mixed_batch_adapter_names_work_or_change_nothing(mixed_model, names):
    model, x, references = mixed_model
    out = []
    with torch.no_grad():
        worked = check_works_or_changes_nothing(model, lambda: out.append(model(x, adapter_names=names)), (x,))
    if worked:
        names = ["a"] * len(x) if names is None else names  # None: the active adapter, "a"
        assert len(names) == len(x)
        for row, name in enumerate(names):
            torch.testing.assert_close(out[0][row], references[name][row], rtol=1e-5, atol=1e-6)


# ---- adapter files from strangers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_adapter(tmp_path_factory):
    """The bytes of a valid adapter for MLP: LoRA on lin0 and lin1 (r=2), head saved in full."""
    directory = tmp_path_factory.mktemp("valid")
    model = get_lora_model(MLP(seed=3), LoraConfig(r=2, target_modules=["lin0", "lin1"], modules_to_save=["head"],
                                                   init_lora_weights=False))
    model.save_pretrained(directory)
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                                     st.text(max_size=5), st.sampled_from(MODULE_NAMES + REGEXES)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=2), max_leaves=5)
config_fields = st.sampled_from(sorted(FIELDS) + ["peft_type", "use_dora", "task_type", "unknown_key"])


@FUZZ
@given(changes=st.one_of(st.just({}), st.dictionaries(config_fields, json_values, max_size=2)),
       cut=st.one_of(st.just(None), st.just(None), st.integers(0, 4000)),
       flips=st.lists(st.tuples(st.one_of(st.integers(0, 400), st.integers(0, 10 ** 6)), st.integers(1, 255)),
                      max_size=3))
def test_a_spoiled_adapter_file_loads_or_changes_nothing(valid_adapter, tmp_path_factory, changes, cut, flips):
    """Config fields set to any JSON, weights truncated anywhere or with bytes flipped (in the header or anywhere)."""
    import json
    import warnings
    directory = tmp_path_factory.mktemp("spoiled")
    config = json.loads(valid_adapter["adapter_config.json"])
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = bytearray(valid_adapter["adapter_model.safetensors"])
    for position, value in flips:
        weights[position % len(weights)] ^= value
    (directory / "adapter_model.safetensors").write_bytes(bytes(weights[:cut] if cut is not None else weights))

    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    x = inputs_for("mlp")
    before, output = model_fingerprint(model), model(*x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_adapter(str(directory), "new")
    except (ValueError, FileNotFoundError) as err:
        event(f"refused: {type(err).__name__}")
        assert str(err)
        assert_same_fingerprint(before, model_fingerprint(model))
        assert torch.equal(model(*x), output)
    else:
        event("loaded")
        assert set(model.peft_config) == {"default", "new"}
