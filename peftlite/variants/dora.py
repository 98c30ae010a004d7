"""DoRA (use_dora=True): weight-decomposed LoRA, as PEFT 0.21 computes it.

The adapted weight is W' = m · (W + s·B·A) / ‖W + s·B·A‖, the norm taken per
output row (per output channel of a convolution, per embedding dimension of an
embedding) and detached from the graph (DoRA paper §4.3). m is the trainable
magnitude, PEFT's `lora_magnitude_vector[name].weight`, initialised to that norm.
With g = m / ‖·‖ the layer's output is, as PEFT writes it,

    h = result + (g − 1) ⊙ (base(x) − bias) + g ⊙ s·B(A(x))

(an embedding: h = g ⊙ (base(x) + s·B(A(x)))). With dropout active in training,
base(x) is recomputed on the dropped-out x, as PEFT does.

The norm needs no out × in temporary. Row i of W + s·ΔW is W_i + s·B_i·A, so

    ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·(W·Aᵀ)_i·B_i + s²·B_i·(A·Aᵀ)·B_iᵀ,

where W·Aᵀ (rows × r) costs rows·cols·r and ‖W_i‖² depends on W alone. Both
the ‖W_i‖² column and the whole norm are cached, keyed by the identity and
version counter of every tensor they were computed from: training recomputes
the norm after every optimizer step (A and B change) but never ‖W_i‖², and
eval without a weight change computes the norm once, so DoRA inference costs
what LoRA inference does plus one elementwise scale.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fast

if TYPE_CHECKING:
    from ..layers.base import LoraLayer

MAGNITUDE = "lora_magnitude_vector"  # PEFT's in-memory container and file key


def _key(*tensors: Tensor) -> tuple[Any, ...]:
    """What identifies these tensors' current values: identity, storage and in-place version of each."""
    return tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors)


def _same(key: tuple[Any, ...] | None, tensors: tuple[Tensor, ...]) -> bool:
    return key is not None and len(key) == len(tensors) and all(
        ref() is t and ptr == t.data_ptr() and version == t._version for (ref, ptr, version), t in zip(key, tensors))


class DoraMagnitude(nn.Module):
    """`lora_magnitude_vector[name]`: the magnitude m as `.weight` (PEFT's layout), and the norm caches.

    weight: (out,) for Linear/Conv1D, (1, out, 1, …) for a convolution, (dim,) for an embedding.
    """

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self.merged_norm: Tensor | None = None  # the norm its merge divided by, for the exact unmerge
        self._row_sq: tuple[tuple[Any, ...], Tensor] | None = None  # (key of W, ‖W_i‖²)
        self._norm: tuple[tuple[Any, ...], Tensor] | None = None  # (key of W, A, B and s, ‖W + s·ΔW‖ rows)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (deepcopy, pickle) drops the caches: their weak references cannot be copied."""
        return {**self.__dict__, "_row_sq": None, "_norm": None}

    def row_norm(self, weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 sources: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """`row_norm` below, cached: recomputed only when W, A, B or s changed since the last call.

        sources: the parameters (W, A, B) the three arguments are views of; the cache is keyed
        by them, since a view made afresh for each call would never match.
        """
        tensors = sources if sources is not None else (weight_rows, lora_A, lora_B)
        norm = self.cached_norm(tensors, scaling, lora_A.dtype)
        if norm is not None:
            return norm
        if self._row_sq is None or not _same(self._row_sq[0], tensors[:1]):
            self._row_sq = (_key(tensors[0]), weight_rows.detach().float().square().sum(1))
        return self.remember_norm(tensors, scaling, row_norm(weight_rows, lora_A, lora_B, scaling, self._row_sq[1]))

    def cached_norm(self, sources: tuple[Tensor, ...], scaling: float, dtype: torch.dtype) -> Tensor | None:
        """The norm last computed from exactly these (W, A, B) and s, or None."""
        if self._norm is not None and self._norm[1].dtype == dtype and _same(self._norm[0][:-1], sources) \
                and self._norm[0][-1] == scaling:
            return self._norm[1]
        return None

    def remember_norm(self, sources: tuple[Tensor, ...], scaling: float, norm: Tensor) -> Tensor:
        self._norm = ((*_key(*sources), scaling), norm)
        return norm

@torch.no_grad()
def row_norm(weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             row_sq: Tensor | None = None) -> Tensor:
    """‖W_i + s·B_i·A‖ per row (rows,), detached, in A's dtype, by rank-r work only.

    weight_rows (rows, cols), lora_A (r, cols), lora_B (rows, r); row_sq: ‖W_i‖² if known.
    """
    if row_sq is None:
        row_sq = weight_rows.float().square().sum(1)
    cross = (weight_rows @ lora_A.to(weight_rows.dtype).T).to(lora_A.dtype)  # (rows, r): the rows·cols·r product
    gram = lora_A @ lora_A.T  # (r, r)
    square = (row_sq.to(lora_A.dtype) + 2 * scaling * (cross * lora_B).sum(1)
              + scaling * scaling * ((lora_B @ gram) * lora_B).sum(1))
    return square.clamp_min(0).sqrt()

def _rows(weight: Tensor, kind: str, fan_in_fan_out: bool) -> Tensor:
    """A base weight (or a delta in its layout) as (rows, cols), one row per DoRA norm."""
    if kind == "conv":
        return weight.flatten(1)
    return weight.T if kind == "embedding" or fan_in_fan_out else weight


def _kind(layer: "LoraLayer") -> str:
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return "embedding"
    return "conv" if base.weight.dim() > 2 else "linear"


def _factor_rows(layer: "LoraLayer", name: str) -> tuple[Tensor, Tensor]:
    """(A (r, cols), B (rows, r)) with ΔW rows = B·A in `_rows`' layout."""
    lora_A, lora_B = layer.factors(name)
    return lora_A.flatten(1), lora_B.flatten(1)


def _magnitude(layer: "LoraLayer", adapter: str) -> DoraMagnitude:
    return getattr(layer, MAGNITUDE)[adapter]


def _gain_view(gain: Tensor, kind: str, ndim: int) -> Tensor:
    """g (rows,) shaped to scale an output of `ndim` dims: channels on dim 1 for a conv, last dim otherwise."""
    return gain.view(1, -1, *([1] * (ndim - 2))) if kind == "conv" else gain


def _weight_gain(gain: Tensor, kind: str, weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """g (rows,) shaped to scale the base weight's rows in its own layout."""
    if kind == "conv":
        return gain.view(-1, *([1] * (weight.dim() - 1)))
    return gain.view(1, -1) if kind == "embedding" or fan_in_fan_out else gain.view(-1, 1)


class Dora:
    """DoRA on Linear, Conv1D (fan_in_fan_out), Conv1d/2d/3d and Embedding layers."""

    name = "dora"
    mixed_batches = False  # PEFT refuses DoRA in mixed-adapter batches too
    combinable = False  # a weighted sum of DoRA adapters has no magnitude PEFT defines

    def create(self, layer: "LoraLayer", adapter: str) -> None:
        if hasattr(layer, "enable_lora"):
            raise ValueError(f"use_dora=True on a fused MergedLinear (enable_lora={layer.enable_lora!r}) is not "
                             "supported: expected enable_lora=None")
        weight = layer.base_layer.weight
        if type(weight) not in (nn.Parameter, Tensor) or not weight.dtype.is_floating_point:
            raise ValueError(f"use_dora=True needs a float base weight, got {type(weight).__name__} "
                             f"{weight.dtype} in {type(layer.base_layer).__name__}")
        magnitudes = getattr(layer, MAGNITUDE, None)
        if magnitudes is None:
            magnitudes = nn.ModuleDict()
            layer.add_module(MAGNITUDE, magnitudes)
            layer.adapter_layer_names = (*layer.adapter_layer_names, MAGNITUDE)
        kind = _kind(layer)
        lora_A, lora_B = _factor_rows(layer, adapter)
        rows = _rows(weight, kind, getattr(layer, "fan_in_fan_out", False))
        if lora_A.device.type == "meta":
            norm = torch.empty(rows.shape[0], dtype=lora_A.dtype, device="meta")
        else:
            norm = row_norm(rows, lora_A, lora_B, layer.adapters[adapter].scaling)
        shape = (1, -1, *([1] * (weight.dim() - 2))) if kind == "conv" else (-1,)
        magnitudes[adapter] = DoraMagnitude(norm.reshape(shape).clone())

    def delete(self, layer: "LoraLayer", adapter: str) -> None:
        magnitudes = getattr(layer, MAGNITUDE, {})
        if adapter in magnitudes:
            del magnitudes[adapter]

    def fast_forward(self, layer: "LoraLayer", adapter: str, x: Tensor) -> Tensor | None:
        """One fused node (peftlite.fast.dora) for a frozen linear base without active dropout (what PEFT's
        formula reduces to then); None where that does not apply."""
        dropout = layer.lora_dropout[adapter]
        base_layer = layer.base_layer
        lora_A, lora_B = layer.factors(adapter)
        if (_kind(layer) != "linear" or isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
                or base_layer.weight.requires_grad or not fast.linear_applies(base_layer, x, lora_A, lora_B)):
            return None
        weight, scaling, fan_in_fan_out = base_layer.weight, layer.adapters[adapter].scaling, \
            getattr(layer, "fan_in_fan_out", False)
        magnitude, folded = _magnitude(layer, adapter), None
        sources, folds = (weight, lora_A, lora_B), fast.dora_folds(x, weight, fan_in_fan_out)
        if folds and magnitude.cached_norm(sources, scaling, lora_A.dtype) is None:
            # W + s·B·A is formed anyway: its row norms cost one pass over it, less than the rank-r route
            with torch.no_grad():
                folded = fast.folded_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out)
                magnitude.remember_norm(sources, scaling, torch.linalg.vector_norm(folded, dim=1))
        gain = self.gain(layer, adapter).to(x.dtype)
        if (gain == 0).any():  # the fused node recovers g ⊙ z from its output by dividing by g
            return None
        return fast.dora_linear(x, weight, base_layer.bias, lora_A, lora_B, gain, scaling, fan_in_fan_out, folds,
                                folded)

    def gain(self, layer: "LoraLayer", adapter: str) -> Tensor:
        """g = m / ‖W + s·ΔW‖ per row (rows,), the norm detached and cached."""
        magnitude = _magnitude(layer, adapter)
        lora_A, lora_B = _factor_rows(layer, adapter)
        weight = layer.base_layer.weight
        rows = _rows(weight, _kind(layer), getattr(layer, "fan_in_fan_out", False))
        norm = magnitude.row_norm(rows, lora_A, lora_B, layer.adapters[adapter].scaling,
                                  sources=(weight, *layer.factors(adapter)))
        return magnitude.weight.view(-1) / norm

    def forward(self, layer: "LoraLayer", adapter: str, x: Tensor, result: Tensor) -> Tensor:
        kind, scaling = _kind(layer), layer.adapters[adapter].scaling
        gain = _gain_view(self.gain(layer, adapter), kind, result.dim())
        if kind == "embedding":
            return (gain * (result + layer.lora_term(x, adapter))).to(result.dtype)
        dropout = layer.lora_dropout[adapter]
        x_d = layer.lora_input(x, adapter)
        lora = layer.lora_B[adapter](layer.lora_A[adapter](x_d))
        base_layer = layer.base_layer
        if isinstance(dropout, nn.Identity) or not layer.training:
            base = result
            if base_layer.bias is not None:
                base = base - (base_layer.bias if kind == "linear" else _gain_view(base_layer.bias, kind, base.dim()))
        elif kind == "linear":
            base = F.linear(x_d, _rows(base_layer.weight, kind, getattr(layer, "fan_in_fan_out", False)).to(x_d.dtype))
        else:
            base = base_layer._conv_forward(x_d, base_layer.weight.to(x_d.dtype), None)
        return result + ((gain - 1) * base + gain * lora * scaling).to(result.dtype)

    def merged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        """g ⊙ (W + ΔW), with the norm of the unmerged base (others merged before are taken out first)."""
        kind, fan_in_fan_out = _kind(layer), getattr(layer, "fan_in_fan_out", False)
        delta = layer.delta_weight(adapter).to(torch.float32)
        base = weight.to(torch.float32)
        for other in reversed(layer.merged_adapters):
            base = layer.adapters[other].variant.unmerged_weight(layer, other, base)
        norm = torch.linalg.vector_norm(_rows(base + delta, kind, fan_in_fan_out), dim=1)
        magnitude = _magnitude(layer, adapter)
        magnitude.merged_norm = norm
        gain = _weight_gain(magnitude.weight.detach().view(-1).float() / norm, kind, weight, fan_in_fan_out)
        return (gain * (weight.to(torch.float32) + delta)).to(weight.dtype)

    def unmerged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        kind, fan_in_fan_out = _kind(layer), getattr(layer, "fan_in_fan_out", False)
        magnitude = _magnitude(layer, adapter)
        if magnitude.merged_norm is None:
            raise ValueError(f"adapter {adapter!r} is not merged on this {type(layer.base_layer).__name__}: "
                             "nothing to unmerge")
        gain = _weight_gain(magnitude.weight.detach().view(-1).float() / magnitude.merged_norm, kind, weight,
                            fan_in_fan_out)
        delta = layer.delta_weight(adapter).to(torch.float32)
        return (weight.to(torch.float32) / gain - delta).to(weight.dtype)


DORA = Dora()
