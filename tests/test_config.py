"""LoraConfig: every field validated with a message naming field, value and what is allowed; dict round trips.

Run: .venv/bin/pytest -q tests/test_config.py
"""

from __future__ import annotations

import dataclasses
import json
import math

import peft
import pytest

from peftlite import LoraConfig
from peftlite.config import BOOKKEEPING

# (field, bad value, words the message must contain besides the field name and the value)
# A value of each PEFT field peftlite refuses (a variant or option it does not implement).
UNSUPPORTED_VALUES = {
    "use_qalora": True, "use_bdlora": {"a": 1}, "layer_replication": [(0, 1)],
    "alora_invocation_tokens": [1],
    "arrow_config": {}, "kasa_config": {}, "monteclora_config": {}, "megatron_config": {}, "eva_config": {},
    "corda_config": {}, "lora_ga_config": {}, "velora_config": {},
}

BAD_VALUES = [
    ("r", 0, "from 1 to"),
    ("r", -3, "from 1 to"),
    ("r", 10**12, "from 1 to 65536"),
    ("r", 2.5, "integer"),
    ("r", True, "integer"),
    ("r", "8", "integer"),
    ("lora_alpha", 0, "> 0"),
    ("lora_alpha", -1.0, "> 0"),
    ("lora_alpha", math.nan, "> 0"),
    ("lora_alpha", "16", "number"),
    ("lora_dropout", -0.1, "[0, 1)"),
    ("lora_dropout", 1.0, "[0, 1)"),
    ("lora_dropout", "0.1", "[0, 1)"),
    ("bias", "some", "lora_only"),
    ("bias", None, "lora_only"),
    ("init_lora_weights", "pissa_niter_0", "gaussian"),
    ("init_lora_weights", 1, "gaussian"),
    ("fan_in_fan_out", "yes", "True or False"),
    ("merge_weights", 1, "True or False"),
    ("use_dora", "yes", "True or False"),
    ("lora_bias", 1, "True or False"),
    ("use_rslora", None, "True or False"),
    ("inference_mode", "false", "True or False"),
    ("target_modules", [], "at least one"),
    ("target_modules", ["q_proj", ""], "module name"),
    ("target_modules", ["q_proj", 3], "module name"),
    ("target_modules", "q_proj(", "regex"),
    ("target_modules", 5, "regex"),
    ("target_parameters", "experts.w", "list"),
    ("exclude_modules", "[", "regex"),
    ("enable_lora", [], "booleans"),
    ("enable_lora", [False, False], "at least one True"),
    ("enable_lora", [1, 0, 1], "booleans"),
    ("modules_to_save", "classifier", "list of module names"),
    ("modules_to_save", ["classifier", ""], "list of module names"),
    ("rank_pattern", ["q_proj"], "dict"),
    ("rank_pattern", {"q_proj": 0}, "from 1 to"),
    ("rank_pattern", {"q_proj": 2.0}, "from 1 to"),
    ("rank_pattern", {"(.+)+Z": 2}, "exponential"),
    ("rank_pattern", {"(": 4}, "regex"),
    ("alpha_pattern", {"q_proj": -2}, "> 0"),
    ("alpha_pattern", {"": 2}, "module name"),
    ("layers_to_transform", [], "non-negative int"),
    ("layers_to_transform", [0, -1], "non-negative int"),
    ("layers_to_transform", "0", "non-negative int"),
    ("layers_to_transform", [True], "non-negative int"),
    ("task_type", 3, "CAUSAL_LM"),
    ("task_type", "CAUSAL", "CAUSAL_LM"),
    ("peft_type", "LOHA", "LoRA only"),
    ("ensure_weight_tying", "yes", "True or False"),
    ("trainable_token_indices", [1, -2], "ints >= 0"),
    ("trainable_token_indices", [1.0, 2], "ints >= 0"),
    ("trainable_token_indices", [True], "ints >= 0"),
    ("trainable_token_indices", "1,2", "list of token ids"),
    ("trainable_token_indices", {"embed_tokens": [1, "2"]}, "ints >= 0"),
    ("trainable_token_indices", {"": [1]}, "module name"),
    ("trainable_token_indices", {3: [1]}, "module name"),
    *[(name, value, "not supported") for name, value in UNSUPPORTED_VALUES.items()],
    ("base_model_name_or_path", 1.0, "string or None"),
    ("revision", ["main"], "string or None"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_raises_value_error_naming_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        LoraConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert allowed in message
    assert "expected" in message or "not a valid regex" in message
    # The bad value itself is shown (for dict patterns: the offending entry).
    shown = [repr(value)]
    if isinstance(value, dict):
        shown += [repr(k) for k in value] + [repr(v) for v in value.values()]
    if isinstance(value, list):
        shown += [repr(v) for v in value]
    assert any(s in message for s in shown), message


def test_every_field_has_a_bad_value_case():
    """A field added to LoraConfig without validation shows up here."""
    free_form = set(BOOKKEEPING)  # PEFT's bookkeeping fields: stored and written back, never used
    covered = {f for f, _, _ in BAD_VALUES}
    assert {f.name for f in dataclasses.fields(LoraConfig)} - free_form == covered


def test_defaults_match_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
                 "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "modules_to_save", "target_modules", "exclude_modules", "inference_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("mode", [True, False, "gaussian"])
def test_valid_values_are_kept(mode):
    config = LoraConfig(r=4, lora_alpha=16.0, target_modules=("v_proj", "q_proj"), lora_dropout=0.1,
                        bias="lora_only", init_lora_weights=mode, rank_pattern={"q_proj": 2},
                        alpha_pattern={r"layers\.0\..*": 3}, layers_to_transform=1, enable_lora=(True, False, True),
                        modules_to_save=("classifier",), task_type="SEQ_CLS")
    assert config.target_modules == ["q_proj", "v_proj"]  # sets/tuples become sorted lists (JSON-able)
    assert config.layers_to_transform == [1]  # an int becomes a one-element list, as PEFT reads it
    assert config.enable_lora == [True, False, True]
    assert config.modules_to_save == ["classifier"]
    assert config.init_lora_weights == mode


def test_regex_and_all_linear_targets_are_accepted():
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"
    assert LoraConfig(exclude_modules=r".*lm_head").exclude_modules == r".*lm_head"


def test_to_dict_from_dict_round_trip_through_json():
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*",
                        lora_dropout=0.05, bias="all", enable_lora=[True, False, True], modules_to_save=["score"],
                        use_rslora=True, init_lora_weights="gaussian", rank_pattern={"q_proj": 8},
                        alpha_pattern={"v_proj": 4.0}, layers_to_transform=[0, 1], task_type="CAUSAL_LM",
                        base_model_name_or_path="some/model", revision="v1", inference_mode=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["peft_type"] == "LORA"
    assert LoraConfig.from_dict(data) == config
    assert json.loads(config.to_json_string()) == data


def test_to_dict_is_a_copy():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    data = config.to_dict()
    data["target_modules"].append("k_proj")
    data["rank_pattern"]["k_proj"] = 4
    assert config.target_modules == ["q_proj"] and config.rank_pattern == {"q_proj": 2}


def test_from_dict_reads_a_peft_config_and_ignores_unknown_keys():
    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                             bias="lora_only", use_rslora=True, rank_pattern={"q_proj": 2},
                             alpha_pattern={"v_proj": 8}, layers_to_transform=[1], task_type="CAUSAL_LM")
    data = json.loads(theirs.to_json_string()) if hasattr(theirs, "to_json_string") else theirs.to_dict()
    ours = LoraConfig.from_dict(data)
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "task_type"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert sorted(ours.target_modules) == sorted(theirs.target_modules)


def test_from_dict_rejects_another_peft_type_and_non_dicts():
    with pytest.raises(ValueError, match="'IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3", "r": 4})
    with pytest.raises(ValueError, match="JSON object"):
        LoraConfig.from_dict(["r", 4])
    with pytest.raises(ValueError, match="r=0"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 0})


@pytest.mark.parametrize("use_rslora", [False, True])
def test_per_module_rank_alpha_and_scaling(use_rslora):
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=use_rslora,
                        rank_pattern={"q_proj": 4, r"model\.layers\.1\.mlp\.up_proj": 2},
                        alpha_pattern={"q_proj": 2})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.mlp.up_proj") == 2
    assert config.rank_for("model.layers.0.mlp.up_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8  # a suffix match is on whole path parts
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 2
    norm = math.sqrt if use_rslora else (lambda r: r)
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(2 / norm(4))
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(16 / norm(8))


@pytest.mark.parametrize("indices", [[0, 5, 5], [], {"embed_tokens": [1], "lm_head": [2, 3]}])
def test_trainable_token_indices_round_trip_as_peft_writes_them(indices):
    """Accepted as PEFT accepts them (duplicates and an empty list too), and read back from PEFT's JSON."""
    theirs = peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices).to_dict()
    ours = LoraConfig.from_dict(json.loads(json.dumps(theirs, default=str)))
    assert ours.trainable_token_indices == indices
    assert json.loads(ours.to_json_file_text())["trainable_token_indices"] == indices
