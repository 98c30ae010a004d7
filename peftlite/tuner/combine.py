"""add_weighted_adapter: a new adapter made from a weighted combination of loaded ones.

PEFT 0.21's semantics for the three exact-to-describe modes. With adapters i,
weights w_i, scalings s_i and ΔW_i = B_i @ A_i · s_i on one layer:

- "linear" (equal ranks): A = Σ sign(w_i)·√|w_i s_i| · A_i, B = Σ √|w_i s_i| · B_i.
  Cheap, but only an approximation of Σ w_i ΔW_i (the cross terms stay).
- "cat": A = [w_1 s_1 A_1; w_2 s_2 A_2; …] stacked on the rank, B = [B_1 B_2 …]:
  exactly Σ w_i ΔW_i, at rank Σ r_i.
- "svd": Σ w_i ΔW_i truncated to its top `svd_rank` singular directions (default
  the largest source rank): B = U·S, A = Vh.

The new adapter has lora_alpha = r (scaling 1), so its A and B carry the whole
update. It goes on every layer that carries any of the sources; a layer without
some source just leaves it out of the sum. Unlike PEFT, rsLoRA sources give an
adapter with use_rslora=False (PEFT keeps use_rslora and so scales the result
by √r, which no mode intends), and a module saved in full by one source is
copied from that source (PEFT gives the new adapter an untrained copy).

Every layer kind is handled in one grouped form, A as (g, r, n) and B as (g, m, r):
g = 1 except for a fused MergedLinear (its enabled slices), n = in (Linear),
num_embeddings (Embedding) or in·kh·kw (Conv2d), m = the slice's out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import _is_number, check_adapter_name
from ..layers import LoraLayer, ParamWrapper

if TYPE_CHECKING:
    from .tuner import LoraTuner

COMBINATION_TYPES = ("linear", "cat", "svd")


def _grouped(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """A (g, r, n) and B (g, m, r) in float32, whatever the layer kind."""
    groups = getattr(layer, "groups", 1)
    lora_A, lora_B = (factor.detach().float() for factor in layer.factors(name))
    return (lora_A.reshape(groups, lora_A.shape[0] // groups, -1),
            lora_B.reshape(groups, lora_B.shape[0] // groups, lora_B.shape[1]))


def _pad_rank(lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A and columns of B up to `rank` (a source missing here, or an SVD of lower rank)."""
    missing = rank - lora_A.shape[1]
    return (torch.nn.functional.pad(lora_A, (0, 0, 0, missing)),
            torch.nn.functional.pad(lora_B, (0, missing)))


def combine_linear(pairs: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """pairs: (A (g, r, n), B (g, m, r), w·s) per source, equal r. √|w·s| on each side, the sign on A."""
    lora_A = torch.stack([math.copysign(math.sqrt(abs(ws)), ws) * A for A, _, ws in pairs]).sum(0)
    lora_B = torch.stack([math.sqrt(abs(ws)) * B for _, B, ws in pairs]).sum(0)
    return lora_A, lora_B


def combine_cat(pairs: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Stack the ranks: A (g, Σr, n) with w·s folded in, B (g, m, Σr). Exactly Σ w·ΔW."""
    return torch.cat([ws * A for A, _, ws in pairs], dim=1), torch.cat([B for _, B, _ in pairs], dim=2)


def combine_svd(pairs: list[tuple[Tensor, Tensor, float]], rank: int) -> tuple[Tensor, Tensor]:
    """Σ w·s·B@A (g, m, n), truncated to `rank` singular directions: B = U·S (g, m, k), A = Vh (g, k, n)."""
    delta = sum(ws * torch.bmm(B, A) for A, B, ws in pairs)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, S.shape[-1])
    return Vh[:, :keep, :], U[:, :, :keep] * S[:, None, :keep]


def _adapter_rank(lora_model: "LoraTuner", name: str) -> int:
    """PEFT's rank of an adapter: the largest r it uses anywhere (r or a rank_pattern value)."""
    config = lora_model.peft_config[name]
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _check_request(lora_model: "LoraTuner", adapters: list[str], weights: list[float], adapter_name: str,
                   combination_type: str, svd_rank: int | None) -> None:
    check_adapter_name(adapter_name)
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists: delete it first or choose another name")
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"adapters={adapters!r} is invalid: expected a non-empty list of adapter names")
    for name in adapters:
        lora_model.check_adapter(name)
    for path, layer in lora_model.lora_layers():
        for name in adapters:
            if name in layer.adapters and not layer.adapters[name].variant.combinable:
                raise ValueError(f"adapter {name!r} is {layer.adapters[name].variant.name} on {path!r}, which "
                                 "add_weighted_adapter cannot combine: expected plain LoRA adapters")
            if name in layer.adapters and layer.adapters[name].lora_bias:
                raise ValueError(f"adapter {name!r} has lora_bias=True on {path!r}, which add_weighted_adapter "
                                 "would drop: expected plain LoRA adapters without lora_bias")
    if (isinstance(weights, str) or not isinstance(weights, (list, tuple)) or len(weights) != len(adapters)
            or not all(_is_number(w) for w in weights)):  # _is_number: finite, and no int too large for a float
        raise ValueError(f"weights={weights!r} is invalid: expected {len(adapters)} finite numbers, one per adapter")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is invalid: expected one of {list(COMBINATION_TYPES)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ValueError(f"svd_rank={svd_rank!r} is invalid: expected None or an integer >= 1")
    if lora_model.adapter_state.merged_count:
        raise ValueError("cannot combine adapters while adapters are merged: call unmerge_adapter() first")
    for path, module in lora_model.saved_modules():
        owners = [name for name in adapters if name in module.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners!r} each save module {path!r} in full: such copies cannot be combined")


def add_weighted_adapter(lora_model: "LoraTuner", adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "linear", svd_rank: int | None = None) -> None:
    """Add `adapter_name`, the weighted combination of `adapters` (not made active; frozen, as in PEFT).

    Args:
        adapters: names of loaded adapters; weights: one number per adapter (negative subtracts).
        combination_type: "linear" (equal ranks), "cat" or "svd"; one adapter always uses "linear".
        svd_rank: the new rank for "svd" (default: the largest source rank).
    Raises:
        ValueError for an unknown source, a bad name, weights, type or rank, or
        "linear" on unequal ranks. Nothing is changed when anything raises.
    """
    _check_request(lora_model, adapters, weights, adapter_name, combination_type, svd_rank)
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [_adapter_rank(lora_model, name) for name in adapters]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combination_type='linear' needs equal ranks, got {dict(zip(adapters, ranks))}: "
                         "use 'cat' or 'svd'")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]

    # Compute every layer's new pair before anything is added (a rank mismatch raises here).
    planned: dict[str, tuple[Tensor, Tensor]] = {}
    for path, layer in lora_model.lora_layers():
        pairs = [(*_grouped(layer, name), weight * layer.adapters[name].scaling)
                 for name, weight in zip(adapters, weights) if name in layer.adapters]
        if not pairs:
            continue
        if isinstance(layer, ParamWrapper):  # per-expert factors: not combined here yet
            raise ValueError(f"add_weighted_adapter does not combine LoRA on parameters yet ({path!r}, parameter "
                             f"{layer.parameter_name!r}, target_parameters): expected adapters on modules only")
        if combination_type == "linear":
            if len({A.shape for A, _, _ in pairs}) != 1:
                raise ValueError(f"combination_type='linear' needs equal ranks, but module {path!r} has ranks "
                                 f"{[A.shape[1] for A, _, _ in pairs]}: use 'cat' or 'svd'")
            lora_A, lora_B = combine_linear(pairs)
        elif combination_type == "cat":
            lora_A, lora_B = combine_cat(pairs)
        else:
            lora_A, lora_B = combine_svd(pairs, new_rank)
        planned[path] = lora_A, lora_B
    if not all(torch.isfinite(t).all() for pair in planned.values() for t in pair):
        raise ValueError(f"weights={weights!r} make the combined A/B overflow to Inf or NaN: expected smaller weights")
    largest = max(A.shape[1] for A, _ in planned.values())
    if combination_type == "svd" and new_rank > largest:
        raise ValueError(f"svd_rank={new_rank} is larger than any layer's combined update can have (at most "
                         f"{largest}): expected svd_rank <= {largest}")
    planned = {path: _pad_rank(lora_A, lora_B, new_rank) for path, (lora_A, lora_B) in planned.items()}

    configs = [lora_model.peft_config[name] for name in adapters]
    saved = list(dict.fromkeys(m for config in configs for m in (config.modules_to_save or [])))
    config = dataclasses.replace(
        configs[0], r=new_rank, lora_alpha=new_rank, use_rslora=False, target_modules=sorted(planned),
        exclude_modules=None, layers_to_transform=None, rank_pattern={}, alpha_pattern={},
        modules_to_save=saved or None, inference_mode=True,
    )
    lora_model.add_adapter(adapter_name, config)
    try:
        _install(lora_model, adapters, adapter_name, planned)
    except Exception:
        lora_model.delete_adapter(adapter_name)
        raise


def _install(lora_model: "LoraTuner", adapters: list[str], adapter_name: str,
             planned: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Copy the planned pairs into the new records, and each saved module from the source that has one."""
    with torch.no_grad():
        for path, layer in lora_model.lora_layers():
            if path in planned:
                lora_A, lora_B = planned[path]
                own_A, own_B = layer.factors(adapter_name)
                own_A.copy_(lora_A.reshape(own_A.shape))
                own_B.copy_(lora_B.reshape(own_B.shape))
        for _, module in lora_model.saved_modules():
            sources = [name for name in adapters if name in module.modules_to_save]
            if sources and adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[sources[0]].state_dict())
