"""LoraConfig: what an adapter is, validated once, stored as PEFT writes it.

The field names are PEFT's so that `adapter_config.json` files move between
the two libraries unchanged. Everything is checked in `__post_init__`, so a
config that exists is a config that can be applied; nothing downstream
re-validates or rewrites it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
BIAS_MODES = ("none", "all", "lora_only")
CONFIG_NAME = "adapter_config.json"
BASE_NAME = "__base__"  # in a mixed batch's adapter_names: this sample runs the base model


def check_adapter_name(name: object) -> str:
    """Adapter names become folder names and dict keys: `[A-Za-z0-9_-]+` only."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is invalid: expected a non-empty string of letters, "
            "digits, '_' or '-'"
        )
    if name == BASE_NAME:
        raise ValueError(f"adapter name {name!r} is reserved: in adapter_names it means 'no adapter'")
    return name


def _check_regex(field_name: str, pattern: object, as_suffix: bool = False) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field_name} regex {pattern!r} is invalid: expected a non-empty regex string")
    try:
        # Compile the form it is used in (`_pattern_value` wraps pattern keys), so inline flags
        # such as "(?i)" inside a wrapped key fail here, not halfway through applying a config.
        re.compile(_suffix_regex(pattern) if as_suffix else pattern)
    except re.error as err:
        raise ValueError(f"{field_name} regex {pattern!r} is not a valid regex: {err}") from None


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


MAX_ALPHA = 3.4e38  # float32's range: the scaling alpha / r is passed to kernels as a float32 scalar


def _is_alpha(value: object) -> bool:
    return _is_number(value) and 0 < value <= MAX_ALPHA


def _check_targets(field_name: str, value: object) -> None:
    """A list of module names, a full-match regex string, or None."""
    if value is None:
        return
    if isinstance(value, str):
        if value == "all-linear" and field_name == "target_modules":
            return
        _check_regex(field_name, value)
        return
    if isinstance(value, (list, tuple, set)):
        if not value:
            raise ValueError(f"{field_name}={value!r} is empty: expected at least one module name")
        for name in value:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{field_name} entry {name!r} is invalid: expected a non-empty module name")
        return
    raise ValueError(
        f"{field_name}={value!r} is invalid: expected a list of module names, a regex string or None"
    )


@dataclass
class LoraConfig:
    """The hyperparameters of one LoRA adapter (PEFT's field names and defaults)."""

    r: int = 8
    lora_alpha: float = 8
    # suffix names | full-match regex | "all-linear" | None = per-architecture default
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    # weight stored (in, out) as in transformers' Conv1D; set per layer automatically for Conv1D
    fan_in_fan_out: bool = False
    # loralib semantics: model.eval() merges, model.train() unmerges
    merge_weights: bool = False
    bias: str = "none"
    # fused QKV: which equal output slices get LoRA (MergedLinear)
    enable_lora: list[bool] | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules, key=repr)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules, key=repr)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r={self.r!r} is invalid: expected an integer >= 1")
        if not _is_alpha(self.lora_alpha):
            raise ValueError(
                f"lora_alpha={self.lora_alpha!r} is invalid: expected a number > 0 and <= {MAX_ALPHA:.4g}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: expected a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is invalid: expected one of {list(BIAS_MODES)}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is invalid: expected True, False or 'gaussian'"
            )
        for name in ("fan_in_fan_out", "merge_weights", "use_rslora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.enable_lora is not None:
            if (not isinstance(self.enable_lora, (list, tuple)) or not self.enable_lora
                    or not all(isinstance(e, bool) for e in self.enable_lora) or not any(self.enable_lora)):
                raise ValueError(
                    f"enable_lora={self.enable_lora!r} is invalid: expected a non-empty list of booleans "
                    "with at least one True"
                )
            self.enable_lora = list(self.enable_lora)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                    isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(
                    f"modules_to_save={self.modules_to_save!r} is invalid: expected a list of module names"
                )
            self.modules_to_save = list(self.modules_to_save)
        for name, check in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                            ("alpha_pattern", _is_alpha)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ValueError(f"{name}={pattern!r} is invalid: expected a dict of regex -> value")
            for key, value in pattern.items():
                _check_regex(name, key, as_suffix=True)
                if not check(value):
                    expected = "an integer >= 1" if name == "rank_pattern" else f"a number > 0 and <= {MAX_ALPHA:.4g}"
                    raise ValueError(f"{name}[{key!r}]={value!r} is invalid: expected {expected}")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    f"layers_to_transform={layers!r} is invalid: expected a non-negative int or a list of them"
                )
            self.layers_to_transform = list(layers)
        for name in ("task_type", "base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} is invalid: expected a string or None")

    def rank_for(self, module_path: str) -> int:
        """The rank of the adapter on `module_path`: the first matching rank_pattern, else r."""
        return _pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: PEFT's keys plus `peft_type`."""
        out = {"peft_type": "LORA"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a dict such as `to_dict()` or a PEFT `adapter_config.json`.

        Keys peftlite does not know are ignored (the caller may warn); `peft_type`
        must be LORA when present.
        """
        if not isinstance(data, dict):
            raise ValueError(f"adapter config {data!r} is invalid: expected a JSON object")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"peft_type={peft_type!r} is not supported: peftlite loads only 'LORA' adapters")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, save_directory: str) -> None:
        """Write `adapter_config.json` into `save_directory` (atomically)."""
        from .files import write_config
        write_config(self, save_directory)

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, **hub_kwargs: Any) -> "LoraConfig":
        """Read `adapter_config.json` from a local directory or a Hub repo."""
        from .files import read_config
        return read_config(model_id_or_path, **hub_kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _suffix_regex(key: str) -> str:
    """A rank/alpha pattern matches a whole path or a dotted suffix of it."""
    return rf"(?:.*\.)?(?:{key})"


def _pattern_value(patterns: dict, module_path: str, default):
    for key, value in patterns.items():
        if re.fullmatch(_suffix_regex(key), module_path):
            return value
    return default
