"""LoraConfig: what an adapter is, validated once, and the one parser of PEFT's config dicts.

The field names and defaults are PEFT 0.21's, every one of them, so code that
builds a `peft.LoraConfig` builds ours unchanged and `adapter_config.json`
files move between the two libraries. `__post_init__` checks everything: a
config that exists can be applied. A PEFT field whose value peftlite cannot
honour (a variant it does not implement, a distributed-only option) is refused
there with the field's name, so `LoraConfig(...)`, `LoraConfig.from_dict(...)`
and reading a file all answer alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config_checks import PLAIN_KEY as _PLAIN_KEY
from .config_checks import check_pattern_key as _check_pattern_key
from .config_checks import check_token_indices
from .config_checks import pattern_regex as _pattern_regex
from .storage.atomic import atomic_write_all, prepare_directory, text_writer
from .storage.hub import resolve

CONFIG_NAME = "adapter_config.json"
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
BASE_NAME = "__base__"  # in a mixed batch's adapter_names: this sample runs the base model
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INIT_MODES = "True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K from 1 to 9999), 'olora' or 'orthogonal'"
INITS = re.compile(r"gaussian|pissa|olora|orthogonal|pissa_niter_[1-9][0-9]{0,3}")  # K: randomized SVD steps
MAX_ALPHA = 3.4e38  # float32's range: alpha / r reaches kernels as a float32 scalar
MAX_RANK = 1 << 16  # far above any useful rank; a typo such as r=10**12 fails here, not in an allocation
# Names nn.Module (and so nn.ModuleDict) owns: an adapter of that name could not be a ModuleDict key.
RESERVED_NAMES = frozenset(name for name in dir(nn.ModuleDict()) if not name.startswith("__"))

# PEFT fields that change the math unless left at one of these values (the first is the default).
UNSUPPORTED: dict[str, tuple] = {
    "use_qalora": (False,), "use_bdlora": (None, False), "layer_replication": (None,),
    "alora_invocation_tokens": (None,), "arrow_config": (None,),
    "kasa_config": (None,), "monteclora_config": (None,), "megatron_config": (None,), "eva_config": (None,),
    "corda_config": (None,), "lora_ga_config": (None,), "velora_config": (None,),
}
# PEFT fields that are bookkeeping or only steer how an adapter is first built.
BOOKKEEPING = ("auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
               "layers_pattern", "loftq_config", "runtime_config")


def check_adapter_name(name: object) -> str:
    """Adapter names become folder names and ModuleDict keys: `[A-Za-z0-9_-]`, 1 to 128 of them."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is invalid: expected 1 to 128 letters, digits, '_' or '-'")
    if name == BASE_NAME or name in RESERVED_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved (it names 'no adapter' or an nn.Module "
                         "attribute): expected another name")
    return name


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_alpha(value: object) -> bool:
    return _is_number(value) and 0 < value <= MAX_ALPHA  # type: ignore[operator]


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANK


def _check_regex(field_name: str, pattern: object) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field_name} regex {pattern!r} is invalid: expected a non-empty regex string")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name} regex {pattern!r} is not a valid regex: {err}") from None


def _check_targets(field_name: str, value: object) -> None:
    """A list of module names, a full-match regex string, or None."""
    if value is None or (value == "all-linear" and field_name == "target_modules"):
        return
    if isinstance(value, str):
        _check_regex(field_name, value)
        return
    if isinstance(value, list):
        if not value and field_name == "target_modules":
            raise ValueError(f"{field_name}={value!r} is empty: expected at least one module name")
        for name in value:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{field_name} entry {name!r} is invalid: expected a non-empty module name")
        return
    raise ValueError(f"{field_name}={value!r} is invalid: expected a list of module names, a regex string or None")


@dataclass
class LoraConfig:
    """The hyperparameters of one LoRA adapter: PEFT's fields and defaults, checked on creation."""

    task_type: str | None = None
    peft_type: str | None = "LORA"
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    # suffix names | full-match regex | "all-linear" | None = per-architecture default
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # weight stored (in, out) as in transformers' Conv1D; read per layer from the base layer's type
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    # token ids of the input embedding whose rows train in full, or {module name: ids}
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list[tuple[int, int]] | None = None
    runtime_config: Any = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    # peftlite's own: loralib's model.eval() merges / model.train() unmerges
    merge_weights: bool = False
    # fused QKV: which equal output slices get LoRA (MergedLinear)
    enable_lora: list[bool] | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name), key=repr))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        for name in ("modules_to_save", "enable_lora", "layers_to_transform"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if self.peft_type is None:
            self.peft_type = "LORA"
        self._validate()

    def _validate(self) -> None:
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r} is not supported: peftlite is LoRA only, expected 'LORA'")
        for name, allowed in UNSUPPORTED.items():
            if not any(getattr(self, name) == value for value in allowed):
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by peftlite: expected "
                                 f"{allowed[0]!r}")
        if not _is_rank(self.r):
            raise ValueError(f"r={self.r!r} is invalid: expected an integer from 1 to {MAX_RANK}")
        if not _is_alpha(self.lora_alpha):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is invalid: expected a number > 0 and <= {MAX_ALPHA:.4g}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: expected a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is invalid: expected one of {list(BIAS_MODES)}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} is invalid: expected None or one of {list(TASK_TYPES)}")
        if not (isinstance(init := self.init_lora_weights, bool) or isinstance(init, str) and INITS.fullmatch(init)):
            raise ValueError(f"init_lora_weights={init!r} is not supported: expected {INIT_MODES}")
        if self.lora_bias is True and (init not in (True, False) or self.use_dora):  # PEFT's rules
            raise ValueError(f"lora_bias=True needs use_dora=False and init True/False, got {self.use_dora}, {init!r}")
        for name in ("fan_in_fan_out", "merge_weights", "use_rslora", "inference_mode", "ensure_weight_tying",
                     "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False")
        if not (self.target_modules == [] and self.target_parameters):  # [] + target_parameters: PEFT's "no modules"
            _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        self._validate_lists()
        check_token_indices(self.trainable_token_indices)
        for name, check, expected in (("rank_pattern", _is_rank, f"an integer from 1 to {MAX_RANK}"),
                                      ("alpha_pattern", _is_alpha, f"a number > 0 and <= {MAX_ALPHA:.4g}")):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ValueError(f"{name}={pattern!r} is invalid: expected a dict of module name -> value")
            for key, value in pattern.items():
                _check_pattern_key(name, key)
                if not check(value):
                    raise ValueError(f"{name}[{key!r}]={value!r} is invalid: expected {expected}")
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} is invalid: expected a string or None")

    def _validate_lists(self) -> None:
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(name, str) and name for name in self.target_parameters)):
            raise ValueError(f"target_parameters={self.target_parameters!r} is invalid: expected a list of "
                             "parameter names such as 'mlp.experts.gate_up_proj'")
        if self.enable_lora is not None and (
                not isinstance(self.enable_lora, list) or not self.enable_lora
                or not all(isinstance(e, bool) for e in self.enable_lora) or not any(self.enable_lora)):
            raise ValueError(f"enable_lora={self.enable_lora!r} is invalid: expected a non-empty list of booleans "
                             "with at least one True")
        if self.modules_to_save is not None and (
                not isinstance(self.modules_to_save, list)
                or not all(isinstance(m, str) and m for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save={self.modules_to_save!r} is invalid: expected a list of module names")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise ValueError(f"layers_to_transform={layers!r} is invalid: expected a non-negative int or a list")

    # ---- per module -----------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        """The rank on `module_path`: the first rank_pattern key it equals or ends with, else r."""
        return _pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- dict and file forms --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form, PEFT's keys (plus peftlite's merge_weights and enable_lora)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "adapter config", require_peft_type: bool = False) -> "LoraConfig":
        """The one parser of a config dict: `to_dict()` output, or a PEFT `adapter_config.json` object.

        Keys neither library knows are dropped with one warning. Every PEFT field is
        either honoured or refused (ValueError naming it and `source`). A file must say
        `peft_type` (require_peft_type), as PEFT requires.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if require_peft_type and "peft_type" not in data:
            raise ValueError(f"{source}: no 'peft_type': expected a PEFT adapter config with \"peft_type\": \"LORA\"")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            warnings.warn(f"{source}: ignoring config keys peftlite does not know: {unknown}", stacklevel=3)
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("runtime_config"), dict):  # PEFT writes its LoraRuntimeConfig as a dict
            kwargs["runtime_config"] = None
        if kwargs.get("init_lora_weights") in ("eva", "corda", "loftq", "lora_ga"):
            kwargs["init_lora_weights"] = True  # only the starting point: a trained adapter is plain LoRA
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ---- adapter_config.json --------------------------------------------------------------------
    def to_file_dict(self) -> dict[str, Any]:
        """The JSON object of adapter_config.json: PEFT's view, plus our extra fields.

        A fused MergedLinear (enable_lora) is written as PEFT's equivalent plain LoRA:
        rank groups·r, and alpha scaled to keep s (groups·alpha, sqrt(groups)·alpha with rsLoRA).
        """
        data = self.to_dict()
        data.pop("runtime_config")  # PEFT does not write it either
        for name, default in (("merge_weights", False), ("enable_lora", None)):  # peftlite's own, when set
            if data[name] == default:
                del data[name]
        rank_factor, alpha_factor = _fused_factors(self.enable_lora, self.use_rslora)
        if rank_factor > 1:
            data["r"] = self.r * rank_factor
            data["lora_alpha"] = self.lora_alpha * alpha_factor
            data["rank_pattern"] = {k: v * rank_factor for k, v in self.rank_pattern.items()}
            data["alpha_pattern"] = {k: v * alpha_factor for k, v in self.alpha_pattern.items()}
        return data

    def to_json_file_text(self) -> str:
        return json.dumps(self.to_file_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file_dict(cls, data: Any, source: str) -> "LoraConfig":
        """The inverse of `to_file_dict`, through `from_dict` (a file must name its peft_type)."""
        config = cls.from_dict(data, source=source, require_peft_type=True)
        rank_factor, alpha_factor = _fused_factors(config.enable_lora, config.use_rslora)
        if rank_factor > 1:
            ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items()}}
            bad = {k: v for k, v in ranks.items() if v % rank_factor}
            if bad:
                raise ValueError(f"{source}: {bad} not divisible by the {rank_factor} enabled slices of "
                                 f"enable_lora={config.enable_lora}: expected PEFT's rank groups·r")
            config = dataclasses.replace(
                config, r=config.r // rank_factor, lora_alpha=config.lora_alpha / alpha_factor,
                rank_pattern={k: v // rank_factor for k, v in config.rank_pattern.items()},
                alpha_pattern={k: v / alpha_factor for k, v in config.alpha_pattern.items()})
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, **ignored: Any) -> None:
        """Write adapter_config.json into `save_directory` (atomically)."""
        directory = prepare_directory(save_directory)
        atomic_write_all(directory, {CONFIG_NAME: text_writer(self.to_json_file_text())})

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, **hub_kwargs: Any) -> "LoraConfig":
        """Read adapter_config.json from a local directory or a Hub repo (revision, subfolder, token, ...)."""
        path = resolve(model_id_or_path, CONFIG_NAME, **hub_kwargs)
        return cls.from_file_dict(read_json(path), path)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def _fused_factors(enable_lora: list[bool] | None, use_rslora: bool) -> tuple[int, float]:
    """(rank factor, alpha factor) turning a MergedLinear config into PEFT's equivalent plain LoRA."""
    groups = sum(enable_lora) if enable_lora else 1
    return groups, (math.sqrt(groups) if use_rslora else groups)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def read_json(path: str) -> Any:
    """A JSON file as Python values; ValueError naming the file for bad JSON or a key given twice."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected a PEFT adapter_config.json") from None


def _pattern_value(patterns: dict, module_path: str, default: Any) -> Any:
    """The value of the first key matching `module_path` as PEFT matches it (a path suffix)."""
    for key, value in patterns.items():
        if _PLAIN_KEY.fullmatch(key):
            if module_path == key or module_path.endswith("." + key):
                return value
        elif re.match(_pattern_regex(key), module_path):
            return value
    return default
