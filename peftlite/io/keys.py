"""The one translation between the in-memory layout and PEFT's file keys.

In memory an adapter lives where PEFT puts it (`<path>.lora_A.<name>.weight`,
`<path>.lora_embedding_A.<name>`, `ModulesToSave.modules_to_save[name]`) and
the base model's own biases. In a PEFT file the same tensors are named
`base_model.model.<module path>.<suffix>` with no adapter name inside:

| in memory                                   | file suffix (after `<path>.`)        |
| ------------------------------------------- | ------------------------------------ |
| Linear / Conv1D / Conv2d / MergedLinear A, B | `lora_A.weight`, `lora_B.weight`     |
| Embedding A, B                              | `lora_embedding_A`, `lora_embedding_B` |
| ModulesToSave copy, its state key `k`       | `k` (e.g. `classifier.weight`)       |
| base bias (bias="all"/"lora_only")          | `bias`, or `base_layer.bias` on a LoRA layer |
| base embedding weight (PEFT's save_embedding_layers) | `weight` / `base_layer.weight` |
| trainable-token rows `token_adapter.trainable_tokens_delta[name]` | `token_adapter.trainable_tokens_delta` |

Keys are only ever *built* from a module path and a suffix in this table;
a file is read by looking its keys up in an index built the same way, so no
key is ever cut apart. The one layout that differs is MergedLinear: PEFT has
no enable_lora, so a fused layer is written as the exactly equivalent plain
LoRA of rank groups·r whose B (out, groups·r) is block-diagonal over the
enabled slices and zero on the disabled ones (see `fused_to_file`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..layers import LoraLayer, MergedLinear, ModulesToSave, is_supported
from ..layers.trainable_tokens import TrainableTokensWrapper
from ..layers.walk import walk
from ..tuner.parameters import find_target_parameters, parameter_layout
from ..tuner.targets import find_modules_to_save
from ..tuner.tokens import own_token_targets

PREFIX = "base_model.model."
PAIR_SUFFIXES = ("lora_A.weight", "lora_B.weight")
EMBEDDING_PAIR_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")
# PEFT saves the full weight of these (EMBEDDING_LAYER_NAMES) when an embedding is targeted or resized.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# A variant's extra tensors: file suffix -> part name in a Slot. DoRA's magnitude is
# `lora_magnitude_vector[name].weight` in memory; lora_bias's is `lora_B[name].bias`.
EXTRA_SUFFIXES = {"lora_magnitude_vector": "M", "lora_B.bias": "bias"}
# A trainable-tokens layer's rows (len(ids), dim); a layer tied to the embedding writes none, as in PEFT.
TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"


def extra_tensors(layer: LoraLayer, name: str) -> dict[str, Tensor]:
    """{part: tensor} of adapter `name`'s extras on `layer` ("M": DoRA magnitude, "bias": B's bias)."""
    out = {}
    magnitudes = getattr(layer, "lora_magnitude_vector", {})
    if name in magnitudes:
        out["M"] = magnitudes[name].weight
    bias = getattr(layer.lora_B[name], "bias", None) if name in layer.lora_B else None
    if bias is not None:
        out["bias"] = bias
    return out


def checked_extras(path: str, layer: LoraLayer, parts: dict[str, Tensor], config: LoraConfig, source: str
                   ) -> dict[str, Tensor]:
    """A file's extras for `path`, checked against the config (use_dora, lora_bias) and the layer's shapes."""
    rows = file_shapes(layer, config.rank_for(path))[1][0]
    extras = {}
    for part, wanted, field in (("M", config.use_dora, "use_dora"), ("bias", config.lora_bias, "lora_bias")):
        suffix = next(s for s, p in EXTRA_SUFFIXES.items() if p == part)
        if (part in parts) != wanted:
            raise ValueError(f"{source}: {path}.{suffix} is {'missing' if wanted else 'present'} but the config "
                             f"says {field}={wanted}: expected the file and its adapter_config.json to agree")
        if wanted:
            if parts[part].numel() != rows:
                raise ValueError(f"{source}: {path}.{suffix} has shape {tuple(parts[part].shape)}, expected "
                                 f"{rows} values, one per output row of {type(layer.base_layer).__name__}")
            extras[part] = parts[part]
    return extras


def set_extras(layer: LoraLayer, name: str, extras: dict[str, Tensor], in_place: bool) -> None:
    """Put loaded extras into adapter `name`'s magnitude / B bias (shaped as the existing parameters)."""
    own = extra_tensors(layer, name)
    with torch.no_grad():
        for part, value in extras.items():
            param = own[part]
            value = value.reshape(param.shape)
            if in_place or param.device.type != "meta":
                param.copy_(value)
            else:
                owner = layer.get_submodule(f"lora_magnitude_vector.{name}" if part == "M" else f"lora_B.{name}")
                owner.register_parameter("weight" if part == "M" else "bias",
                                         nn.Parameter(value.to(dtype=param.dtype), requires_grad=param.requires_grad))


def pair_suffixes(module: nn.Module) -> tuple[str, str]:
    """PEFT's names for A and B on a LoRA layer, or on the layer a base module would become."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return EMBEDDING_PAIR_SUFFIXES if isinstance(base, nn.Embedding) else PAIR_SUFFIXES


def key(prefix: str, path: str, suffix: str) -> str:
    return f"{prefix}{path}.{suffix}" if path else f"{prefix}{suffix}"


def parse_file_key(name: str) -> tuple[str, str] | None:
    """(module path, "lora_A" | "lora_B") for a LoRA factor's file key, else None (a saved module, a bias)."""
    body = name.removeprefix(PREFIX)
    for suffixes in (PAIR_SUFFIXES, EMBEDDING_PAIR_SUFFIXES):
        for part, suffix in zip(("lora_A", "lora_B"), suffixes):
            if body.endswith("." + suffix):
                return body[:-len(suffix) - 1], part
    return None


# ---- MergedLinear <-> PEFT's plain LoRA ----------------------------------------------------------
def fused_to_file(layer: MergedLinear, lora_B: Tensor) -> Tensor:
    """Our B (groups·out_slice, r) as PEFT's B' (out, groups·r): block-diagonal on the enabled rows.

    With A' = our A (groups·r, in), B' @ A' puts B_g @ A_g on slice g's rows and
    zeros elsewhere, which is exactly MergedLinear's ΔW.
    """
    blocks = torch.block_diag(*lora_B.chunk(layer.groups, dim=0))  # (groups·out_slice, groups·r)
    full = blocks.new_zeros(layer.out_features, blocks.shape[1])
    return full.index_copy(0, layer.enabled_columns.to(full.device), blocks)


def fused_from_file(layer: MergedLinear, file_B: Tensor, name: str) -> Tensor:
    """Inverse of `fused_to_file`; ValueError if B' is not block-structured (e.g. trained further in PEFT)."""
    r = file_B.shape[1] // layer.groups
    rows = file_B.index_select(0, layer.enabled_columns.to(file_B.device))  # (groups·out_slice, groups·r)
    slice_size = rows.shape[0] // layer.groups
    lora_B = torch.cat([rows[g * slice_size:(g + 1) * slice_size, g * r:(g + 1) * r]
                        for g in range(layer.groups)])
    if not torch.equal(fused_to_file(layer, lora_B), file_B):
        raise ValueError(
            f"{name}: expected the block-diagonal B of a MergedLinear with enable_lora={layer.enable_lora} "
            "(zeros off the enabled slices' blocks); this adapter cannot be loaded with enable_lora — "
            "load it with a config without enable_lora"
        )
    return lora_B


def file_shapes(layer: LoraLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B as they appear in a PEFT file for rank r on this layer."""
    shape_A, shape_B = layer.factor_shapes(r)
    if isinstance(layer, MergedLinear):
        shape_B = (layer.out_features, layer.groups * r)
    return tuple(shape_A), tuple(shape_B)


# ---- saving --------------------------------------------------------------------------------------
def adapter_tensors(root: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, Tensor]:
    """Everything PEFT would save for `adapter_name` in model `root`, under PEFT's keys (detached, contiguous)."""
    out: dict[str, Tensor] = {}
    for path, module in walk(root):
        if isinstance(module, LoraLayer):
            if adapter_name not in module.adapters:
                continue
            lora_A, lora_B = module.factors(adapter_name)
            if isinstance(module, MergedLinear):
                lora_B = fused_to_file(module, lora_B)
            suffix_A, suffix_B = pair_suffixes(module)
            out[key(PREFIX, path, suffix_A)] = lora_A
            out[key(PREFIX, path, suffix_B)] = lora_B
            for suffix, part in EXTRA_SUFFIXES.items():
                extras = extra_tensors(module, adapter_name)
                if part in extras:
                    out[key(PREFIX, path, suffix)] = extras[part]
            if config.bias == "lora_only" and module.bias is not None:
                out[key(PREFIX, path, "base_layer.bias")] = module.bias
        elif isinstance(module, ModulesToSave):
            if adapter_name in module.modules_to_save:
                for name, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[key(PREFIX, path, name)] = tensor
        elif isinstance(module, TrainableTokensWrapper):
            layer = module.token_adapter
            if layer.tied_adapter is None and adapter_name in layer.trainable_tokens_delta:
                out[key(PREFIX, path, TOKENS_SUFFIX)] = layer.trainable_tokens_delta[adapter_name]
    if config.bias == "all":
        out.update({name: tensor for name, tensor in _base_tensors(root, PREFIX)
                    if "bias" in name and name not in out})
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def _base_tensors(root: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """The base model's own parameters under their PEFT keys (`<path>.base_layer.x` on a LoRA layer)."""
    for path, module in walk(root):
        if isinstance(module, ModulesToSave):
            continue
        if isinstance(module, LoraLayer):
            for name, param in module.base_layer.named_parameters():
                yield key(prefix, path, "base_layer." + name), param
        else:
            for name, param in module._parameters.items():
                if param is not None:
                    yield key(prefix, path, name), param


# ---- loading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """Where one file tensor goes.

    kind "lora": factor `part` ("A"/"B") of the adapter on module `path`;
    "saved": state key `part` of the modules_to_save copy at `path`;
    "base": a base-model tensor (`target`) that PEFT files may carry (biases, embedding weights).
    """

    kind: str
    path: str
    part: str = ""
    target: Tensor | None = None


def build_index(root: nn.Module, config: LoraConfig, prefix: str = PREFIX) -> dict[str, Slot]:
    """Every file key an adapter with `config` may hold for this model, mapped to its Slot.

    Built with the same table as saving, in one walk over the base model
    (not into adapter records, so its cost does not grow with loaded adapters).
    """
    saved = find_modules_to_save(root, config)
    index: dict[str, Slot] = {}
    for name, tensor in _base_tensors(root, prefix):
        if "bias" in name:
            index[name] = Slot("base", "", target=tensor)
    for path, module in walk(root):
        base: Any = module.base_layer if isinstance(module, LoraLayer) else module
        if path in saved:
            original = module.original_module if isinstance(module, ModulesToSave) else module
            for name, tensor in original.state_dict(keep_vars=True).items():
                index[key(prefix, path, name)] = Slot("saved", path, name)
                # PEFT with bias="all" also writes the wrapper's inner copies of the biases.
                index[key(prefix, path, "modules_to_save." + name)] = Slot("saved", path, name)
                if "bias" in name:
                    index[key(prefix, path, "original_module." + name)] = Slot("base", "", target=tensor)
            continue
        if isinstance(module, ModulesToSave) or any(path.startswith(p + ".") for p in saved):
            continue
        if path and is_supported(base):
            suffix_A, suffix_B = pair_suffixes(module)
            index[key(prefix, path, suffix_A)] = Slot("lora", path, "A")
            index[key(prefix, path, suffix_B)] = Slot("lora", path, "B")
            if isinstance(base, nn.MultiheadAttention):  # its out_proj's pair, where PEFT keeps it
                for part, suffix in zip("AB", PAIR_SUFFIXES):
                    index[key(prefix, path, "base_layer.out_proj." + suffix)] = Slot(
                        "lora", f"{path}.base_layer.out_proj", part)
            for suffix, part in EXTRA_SUFFIXES.items():
                index[key(prefix, path, suffix)] = Slot("lora", path, part)
            if isinstance(base, nn.Embedding) or path.split(".")[-1] in EMBEDDING_LAYER_NAMES:
                index[key(prefix, path, "weight")] = Slot("base", "", target=base.weight)
                index[key(prefix, path, "base_layer.weight")] = Slot("base", "", target=base.weight)
            if getattr(base, "bias", None) is not None:
                index[key(prefix, path, "base_layer.bias")] = Slot("base", "", target=base.bias)
                index[key(prefix, path, "bias")] = Slot("base", "", target=base.bias)
    # target_parameters: a wrapper nested d deep has its keys at `<module path>` + ".base_layer"·d, as in PEFT
    for target, path, depth in parameter_layout(root, find_target_parameters(root, config)):
        wrapper_path = path + ".base_layer" * depth
        for part, suffix in zip("AB", PAIR_SUFFIXES):
            index[key(prefix, wrapper_path, suffix)] = Slot("lora", target, part)
    return index


def take_token_rows(root: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source: str
                    ) -> dict[str, Tensor]:
    """Remove the trainable-token rows from a file's tensors: {module path: rows (len(ids), dim)}.

    Every module the config's trainable_token_indices names must have its rows, in
    that shape; ValueError otherwise, before anything changes.
    """
    prefix = file_prefix(list(tensors))
    rows = {}
    for target in own_token_targets(root, config):
        name = key(prefix, target.path, TOKENS_SUFFIX)
        module: Any = root.get_submodule(target.path)
        module = module.original_module if isinstance(module, TrainableTokensWrapper) else module
        if name not in tensors:
            raise ValueError(f"{source}: no {name!r}: expected the rows of trainable_token_indices for "
                             f"{target.path!r}, as the adapter config says")
        expected = (len(target.indices), module.weight.shape[1])
        if tuple(tensors[name].shape) != expected:
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {expected} "
                             f"({len(target.indices)} token ids × the weight's {expected[1]} columns)")
        rows[target.path] = tensors.pop(name)
    return rows


def set_token_rows(root: nn.Module, adapter_name: str, rows: dict[str, Tensor]) -> None:
    """Copy loaded rows into adapter `adapter_name`'s trainable-token parameters."""
    with torch.no_grad():
        for path, value in rows.items():
            module = root.get_submodule(path)
            assert isinstance(module, TrainableTokensWrapper)
            module.token_adapter.trainable_tokens_delta[adapter_name].copy_(value)


def file_prefix(keys: list[str]) -> str:
    """PEFT writes `base_model.model.`; transformers' own PEFT integration writes keys without it."""
    return PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
