"""Which modules of a model get LoRA: SPEC's target-selection rules, nothing else.

A module is named by its dotted path (`model.layers.0.self_attn.q_proj`).
A list of names matches a path equal to a name or ending with `.name`; a
string is a regex that must match the whole path; "all-linear" is every
Linear/Conv1D except the output head; None uses a per-architecture default.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from ..config import LoraConfig
from ..layers import LINEAR_TYPES, LoraLayer, is_quantized_linear, is_supported

# PEFT's defaults for target_modules=None, by transformers `model_type`.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "vit": ["query", "value", "q_proj", "v_proj"],  # transformers 5 renamed ViT's query/value to q_proj/v_proj
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "mpt": ["Wqkv"],
    "swin": ["qkv"],
}

# Heads PEFT trains in full for task_type "SEQ_CLS" (whichever of them the model has).
SEQ_CLS_HEADS = ("classifier", "score")

# Lazy: the first numbered segment is the layer (`layers.1.experts.0.w1` is layer 1), as PEFT reads it.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def matches(path: str, selector: list[str] | str) -> bool:
    """A list matches by equal path or `.name` suffix; a string is a full-match regex."""
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(path == name or path.endswith("." + name) for name in selector)


def layer_index(path: str) -> int | None:
    """The repeated-block index of a path (`model.layers.3.mlp.up_proj` -> 3), as PEFT reads it."""
    found = _LAYER_INDEX.match(path)
    return int(found.group(1)) if found else None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head that "all-linear" leaves alone."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for path, module in model.named_modules():
        if path.split(".")[-1] == "lm_head" or (output is not None and module is output):
            heads.add(path)
    return heads


def base_of(module: nn.Module) -> nn.Module:
    """The original layer behind a LoRA wrapper (or the module itself)."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def candidate_names(model: nn.Module) -> list[str]:
    """Short names of every module that could take LoRA, for error messages."""
    return sorted({path.rsplit(".", 1)[-1] for path, module in model.named_modules()
                   if path and _is_selectable(path) and is_supported(base_of(module))})


def _is_selectable(path: str) -> bool:
    """Paths inside our own wrappers (the wrapped base, saved copies) are never targets themselves."""
    parts = path.split(".")
    return not any(p in ("base_layer", "original_module", "modules_to_save") for p in parts)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules=None has no default for model_type {model_type!r}: pass target_modules "
            f"(known defaults: {sorted(DEFAULT_TARGETS)}); candidate modules: {candidate_names(model)}"
        )
    return DEFAULT_TARGETS[model_type]


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted paths of the modules the config adapts, in model order.

    Raises ValueError when the selection matches nothing, listing the candidates.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_parameters and (config.target_modules == [] or (config.target_modules is None
                                                                     and model_type not in DEFAULT_TARGETS)):
        return []  # PEFT: target_parameters alone, no module targets
    selector = config.target_modules if config.target_modules is not None else default_targets(model)
    heads = output_head_names(model) if selector == "all-linear" else set()
    layers = [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform
    found = []
    for path, module in model.named_modules():
        if not path or not _is_selectable(path):
            continue
        base = base_of(module)
        if selector == "all-linear":
            if (type(base) not in LINEAR_TYPES and not is_quantized_linear(base)) or path in heads:
                continue
        elif not matches(path, selector):
            continue
        if config.exclude_modules is not None and matches(path, config.exclude_modules):
            continue
        if layers is not None and layer_index(path) not in layers:
            continue
        found.append(path)
    if not found:
        raise ValueError(
            f"target_modules={selector!r} matched no module (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}); candidate modules: {candidate_names(model)}"
        )
    return found


CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def modules_to_save_names(config: LoraConfig) -> list[str]:
    """config.modules_to_save, plus the classification heads for task_type SEQ_CLS (as PEFT adds them)."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += [head for head in SEQ_CLS_HEADS if head not in names]
    return names


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules the config trains in full, outermost first.

    Names that match no module are skipped, as PEFT skips them: code written for
    several architectures passes ["classifier", "score"] and has one of them.
    A container (ModuleDict, ModuleList, ...) has no forward to wrap: ValueError.
    """
    names = modules_to_save_names(config)
    found: list[str] = []
    if not names:
        return found
    for path, module in model.named_modules():
        if (path and _is_selectable(path) and matches(path, names)
                and not any(path.startswith(p + ".") for p in found)):
            if isinstance(module, CONTAINERS):
                raise ValueError(f"modules_to_save entry {path!r} is a {type(module).__name__}, which has no "
                                 "forward to wrap: expected a module such as a Linear head")
            found.append(path)
    missing = [name for name in config.modules_to_save or [] if not any(matches(p, [name]) for p in found)]
    if missing:
        warnings.warn(f"modules_to_save entries {missing!r} match no module of the model; skipped, as PEFT "
                      "does", stacklevel=4)
    return found
