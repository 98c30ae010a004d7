"""Seed-era fused-QKV adapter files (PEFT 0.2/0.3, loralib): told apart by shape, read as today's layout.

Those files carry `enable_lora` in adapter_config.json with `r` the rank of
each enabled slice, and loralib's tensors, for g enabled slices out of n:
lora_A (g·r, in) and lora_B (g·out_slice, r), or (g·out_slice, r, 1) as PEFT
0.3 saved its grouped Conv1d. peftlite (like PEFT, which ignores enable_lora)
writes the equivalent plain LoRA: r_file = g·r and B (n·out_slice, g·r),
block-diagonal over the enabled slices (keys.fused_to_file). A legacy file is
rewritten into that layout here, before anything else reads it.

Shapes decide, per module, with A (a, in) and B (b, c[, 1]):
  today's layout: c == a (B's columns are A's rows, g·r);
  legacy layout:  B is 3-D, or c·g == a (B's columns are r).
With g ≥ 2 at most one holds. With g = 1 both can: then today's B has n·out_slice
rows, zero outside the enabled slice, and a legacy B has out_slice rows, so a
B whose rows do not split that way is legacy. A file whose modules disagree, or
a module that fits neither layout, is refused naming it and its shapes.
loralib's own state dicts name the factors `<path>.lora_A` (no `.weight`);
those names are read as PEFT's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

LEGACY_SUFFIXES = {".lora_A": ".lora_A.weight", ".lora_B": ".lora_B.weight"}


def _factor_pairs(tensors: dict[str, Tensor]) -> dict[str, dict[str, str]]:
    """{module key prefix: {"A": key, "B": key}} for every lora_A/lora_B weight in the file."""
    pairs: dict[str, dict[str, str]] = {}
    for name in tensors:
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[:-len(suffix)], {})[part] = name
    return pairs


def _is_legacy(lora_A: Tensor, lora_B: Tensor, enable_lora: list[bool], name: str) -> bool:
    """Which layout one module's factors are in (see the module docstring); ValueError if neither."""
    groups, slices = sum(enable_lora), len(enable_lora)
    rows_A, rows_B, cols_B = lora_A.shape[0], lora_B.shape[0], lora_B.shape[1]
    legacy = lora_A.dim() == 2 and (lora_B.dim() == 3 and lora_B.shape[2] == 1 or lora_B.dim() == 2) \
        and cols_B * groups == rows_A
    current = lora_A.dim() == 2 and lora_B.dim() == 2 and cols_B == rows_A
    if legacy and current:  # g = 1: today's B is n slices tall, zero off the enabled one
        if slices == 1:
            return False
        if rows_B % slices:
            return True
        blocks = lora_B.reshape(slices, rows_B // slices, cols_B)
        off = [i for i, on in enumerate(enable_lora) if not on]
        return bool(blocks[off].any())
    if not (legacy or current):
        raise ValueError(f"{name}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} fit neither "
                         f"fused layout for enable_lora={enable_lora}: expected lora_B (out, {rows_A}) "
                         f"(PEFT's) or (out_slice·{groups}, {rows_A // groups if groups else '?'}) (loralib's)")
    return legacy


def _to_current(lora_B: Tensor, enable_lora: list[bool]) -> Tensor:
    """A legacy B (g·out_slice, r[, 1]) as today's B (n·out_slice, g·r), block-diagonal on the enabled slices."""
    lora_B = lora_B.reshape(lora_B.shape[0], lora_B.shape[1])
    groups = sum(enable_lora)
    blocks = torch.block_diag(*lora_B.chunk(groups, dim=0))  # (g·out_slice, g·r)
    slice_size = lora_B.shape[0] // groups
    full = blocks.new_zeros(slice_size * len(enable_lora), blocks.shape[1])
    enabled = [i for i, on in enumerate(enable_lora) if on]
    for g, i in enumerate(enabled):
        full[i * slice_size:(i + 1) * slice_size] = blocks[g * slice_size:(g + 1) * slice_size]
    return full


def fused_layout(config: dict[str, Any], tensors: dict[str, Tensor], source: str) -> str:
    """"legacy", "current" or "plain" (no enable_lora) for a file's config dict and tensors."""
    enable_lora = config.get("enable_lora") if isinstance(config, dict) else None
    if not isinstance(enable_lora, list) or not enable_lora or not all(isinstance(e, bool) for e in enable_lora) \
            or not any(enable_lora):
        return "plain"
    verdicts = {}
    for prefix, parts in _factor_pairs(tensors).items():
        if parts.keys() == {"A", "B"}:
            verdicts[prefix] = _is_legacy(tensors[parts["A"]], tensors[parts["B"]], enable_lora,
                                          f"{source}: {prefix}")
    if len(set(verdicts.values())) > 1:
        legacy = next(p for p, v in verdicts.items() if v)
        current = next(p for p, v in verdicts.items() if not v)
        raise ValueError(f"{source}: ambiguous fused layout: {legacy!r} has loralib's shapes (r per slice) but "
                         f"{current!r} has PEFT's (B out × g·r): expected one layout for the whole file")
    return "legacy" if any(verdicts.values()) else "current"


def read_legacy_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """loralib's `<path>.lora_A` / `.lora_B` names as PEFT's `.lora_A.weight` / `.lora_B.weight`."""
    out = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in LEGACY_SUFFIXES if name.endswith(s)), None)
        out[name[:-len(suffix)] + LEGACY_SUFFIXES[suffix] if suffix else name] = tensor
    return out


def from_legacy_fused(config: dict[str, Any], tensors: dict[str, Tensor], source: str
                      ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A file's (config dict, tensors) in today's fused layout, unchanged unless they are legacy.

    Legacy: r (and rank_pattern) times g, lora_alpha (and alpha_pattern) times g (√g with
    rsLoRA) so the scaling stays, and every B made block-diagonal (n·out_slice, g·r).
    """
    tensors = read_legacy_names(tensors)
    if fused_layout(config, tensors, source) != "legacy":
        return config, tensors
    enable_lora = config["enable_lora"]
    groups = sum(enable_lora)
    alpha_factor = math.sqrt(groups) if config.get("use_rslora") else groups
    converted = dict(config)
    converted["r"] = config.get("r", 8) * groups
    converted["lora_alpha"] = config.get("lora_alpha", 8) * alpha_factor
    converted["rank_pattern"] = {k: v * groups for k, v in (config.get("rank_pattern") or {}).items()}
    converted["alpha_pattern"] = {k: v * alpha_factor for k, v in (config.get("alpha_pattern") or {}).items()}
    out = dict(tensors)
    for parts in _factor_pairs(tensors).values():
        if "B" in parts:
            out[parts["B"]] = _to_current(tensors[parts["B"]], enable_lora)
    return converted, out
