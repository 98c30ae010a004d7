"""LoRA layers: one class per kind of base layer, all of the same shape.

Each layer wraps the original module (its weights are never copied or
re-initialised) and keeps one `LoraAdapter` record per adapter name in an
`nn.ModuleDict`. Which adapter runs is read from an `AdapterState` that every
layer of one model shares, so switching adapters is one assignment, not a walk
over the model. Every class does four things, as loralib's do: build the
adapter's parameters, compute the low-rank term (`lora_delta`), compute ΔW
(`delta_weight`) for merging, and forward = base output + low-rank term.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from . import batching
from . import functional as LF
from . import masks


class AdapterState:
    """The per-model switchboard, shared by reference by every LoRA layer of a model.

    `active` names the adapter that runs (None: none); `disabled` turns every
    adapter off (the `disable_adapter()` context); `merged_count` counts
    (layer, adapter) merges so the model can tell "anything merged?" in O(1);
    `mixed_calls` holds a token per mixed-adapter call running now in any thread
    (see batching.mixed_adapters), so that without one, layers skip the per-thread
    routing lookup, which torch.compile cannot trace.
    """

    def __init__(self) -> None:
        self.active: str | None = None
        self.disabled: bool = False
        self.merged_count: int = 0
        self.mixed_calls: list[object] = []  # append and remove are atomic: no lock needed


class LoraAdapter(nn.Module):
    """One adapter on one layer: the trainable pair and its fixed hyperparameters.

    lora_A: (r, in) — or (r·groups, in) fused, (r, num_embeddings), (r, in, kh, kw).
    lora_B: (out, r) — or (out_slice·groups, r) fused, (dim, r), (out, r, 1, 1).
    """

    def __init__(self, lora_A: Tensor, lora_B: Tensor, r: int, scaling: float,
                 dropout: float, merge_weights: bool) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.r = r
        self.scaling = scaling
        self.dropout = dropout  # probability, applied to the adapter's input in training mode only
        self.merge_weights = merge_weights

    def dropped(self, x: Tensor) -> Tensor:
        return masks.dropout(x, self.dropout_now())

    def dropout_now(self) -> float:
        """The dropout probability in effect: 0 without dropout or in eval mode."""
        return self.dropout if self.training else 0.0


class LoraLayer(nn.Module):
    """What every LoRA layer shares: the wrapped base, the adapter records, merging."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # adapter names merged into base_layer.weight, in merge order
        self.state = state

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float,
                    init: bool | str | None, merge_weights: bool) -> None:
        """Create the record for adapter `name` with parameters on the base weight's device and dtype.

        init=None leaves A and B uninitialised: for loading, where the caller
        overwrites both right away and a random init would be wasted work.
        """
        weight = self.base_layer.weight
        shape_A, shape_B = self.adapter_shapes(r)
        lora_A = torch.empty(shape_A, device=weight.device, dtype=weight.dtype)
        lora_B = torch.empty(shape_B, device=weight.device, dtype=weight.dtype)
        if init is not None:
            self.init_pair(lora_A, lora_B, init)
        self.adapters[name] = LoraAdapter(lora_A, lora_B, r, scaling, dropout, merge_weights)

    def init_pair(self, lora_A: Tensor, lora_B: Tensor, init: bool | str) -> None:
        LF.init_lora_pair(lora_A, lora_B, init)

    def active_adapter(self) -> LoraAdapter | None:
        """The record to run in forward, or None when adapters are off, merged or absent here."""
        state = self.state
        if state.disabled or state.active is None or state.active in self.merged:
            return None
        return self.adapters[state.active] if state.active in self.adapters else None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        routing = batching.active_routing(self.state)
        if routing is not None:  # a mixed-adapter batch: each sample its own adapter
            return batching.mixed_lora_forward(self, routing, x, *args, **kwargs)
        adapter = self.active_adapter()
        if adapter is not None and not args and not kwargs:
            fused = self.fused_forward(x, adapter)
            if fused is not None:  # the training path: base and low-rank term in one op
                return fused
        result = self.base_layer(x, *args, **kwargs)
        if adapter is None:
            return result
        return result + self.lora_delta(x, adapter).to(result.dtype)

    def fused_forward(self, x: Tensor, adapter: LoraAdapter) -> Tensor | None:
        """base(x) + low-rank term computed together, or None where only the plain path applies."""
        return None

    def merge(self, name: str) -> None:
        """Add ΔW of adapter `name` into the base weight."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged into {type(self.base_layer).__name__}")
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(self.delta_weight(self.adapters[name]).to(weight.dtype))
        self.merged.append(name)
        self.state.merged_count += 1

    def merge_is_finite(self, name: str) -> bool:
        """Whether merging `name` would leave every weight finite (safe_merge checks all layers first)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            return bool(torch.isfinite(weight + self.delta_weight(self.adapters[name]).to(weight.dtype)).all())

    def unmerge(self) -> None:
        """Subtract every merged ΔW, last merged first."""
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged:
                name = self.merged.pop()
                weight.sub_(self.delta_weight(self.adapters[name]).to(weight.dtype))
                self.state.merged_count -= 1

    def train(self, mode: bool = True) -> "LoraLayer":
        """loralib semantics for an active adapter made with merge_weights=True: eval merges, train unmerges."""
        super().train(mode)
        name = self.state.active
        if name not in self.adapters or not self.adapters[name].merge_weights:
            return self
        if mode and name in self.merged:
            self.unmerge()
        elif not mode and name not in self.merged and not self.state.disabled:
            self.merge(name)
        return self

    # Per-kind: shapes, the low-rank term and ΔW.
    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_delta(self, x: Tensor, adapter: LoraAdapter) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, adapter: LoraAdapter) -> Tensor:
        raise NotImplementedError


def _same_dtype_no_autocast(x: Tensor, weight: Tensor, adapter: LoraAdapter) -> bool:
    """Whether the fused paths apply: no casts needed (else the plain path casts, as PEFT does)."""
    return (x.dtype == weight.dtype == adapter.lora_A.dtype == adapter.lora_B.dtype
            and not torch.is_autocast_enabled(x.device.type))


def _runs_own_forward(base: nn.Module, *forwards) -> bool:
    """Whether calling `base` would run exactly one of `forwards`: no subclass override, no hooks."""
    return (type(base).forward in forwards and "forward" not in base.__dict__
            and not base._forward_hooks and not base._forward_pre_hooks)


def _linear_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight in × out)."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


class Linear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (whose weight is in × out: fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, state)
        # The weight layout is a fact of the base layer: Conv1D stores (in, out), nn.Linear (out, in).
        if fan_in_fan_out and not isinstance(base_layer, Conv1D):
            warnings.warn("fan_in_fan_out=True ignored for an nn.Linear (its weight is out × in), as PEFT does",
                          stacklevel=2)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = _linear_features(base_layer)
        self.slices = ((0, self.out_features),)  # (first output column, width) of each adapter group

    def adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def lora_delta(self, x: Tensor, adapter: LoraAdapter) -> Tensor:
        x = adapter.dropped(x).to(adapter.lora_A.dtype)
        return LF.linear_delta(x, adapter.lora_A, adapter.lora_B, adapter.scaling)

    def fused_forward(self, x: Tensor, adapter: LoraAdapter) -> Tensor | None:
        """One `LoraLinearFunction` node: saves x once, the dropout mask as bools, adds B·A in place."""
        base = self.base_layer
        if not (_runs_own_forward(base, nn.Linear.forward, Conv1D.forward)
                and _same_dtype_no_autocast(x, base.weight, adapter)):
            return None
        return LF.lora_linear(x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                              isinstance(base, Conv1D), self.slices, adapter.dropout_now())

    def delta_weight(self, adapter: LoraAdapter) -> Tensor:
        return LF.linear_delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling, self.fan_in_fan_out)


class MergedLinear(Linear):
    """LoRA on a fused projection (e.g. QKV) where only some equal output slices adapt.

    enable_lora [True, False, True] on out = 3·d: slices 0 and 2 get a rank-r
    update each, computed together as one grouped op; slice 1 gets exactly zero.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, enable_lora: list[bool],
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, state, fan_in_fan_out)
        if self.out_features % len(enable_lora):
            raise ValueError(
                f"enable_lora={enable_lora!r} has {len(enable_lora)} slices, which does not divide "
                f"the fused output size {self.out_features}"
            )
        self.enable_lora = list(enable_lora)
        self.groups = sum(enable_lora)
        slice_size = self.out_features // len(enable_lora)
        self.slices = tuple((i * slice_size, slice_size) for i, on in enumerate(enable_lora) if on)
        columns = [i * slice_size + j for i, on in enumerate(enable_lora) if on for j in range(slice_size)]
        self.register_buffer("enabled_columns", torch.tensor(columns, device=base_layer.weight.device),
                             persistent=False)

    def adapter_shapes(self, r: int):
        return (r * self.groups, self.in_features), (len(self.enabled_columns), r)

    def lora_delta(self, x: Tensor, adapter: LoraAdapter) -> Tensor:
        x = adapter.dropped(x).to(adapter.lora_A.dtype)
        delta = LF.grouped_delta(x, adapter.lora_A, adapter.lora_B, self.groups, adapter.scaling)
        return delta.new_zeros(*delta.shape[:-1], self.out_features).index_copy(-1, self.enabled_columns, delta)

    def delta_weight(self, adapter: LoraAdapter) -> Tensor:
        enabled = LF.grouped_delta_weight(adapter.lora_A, adapter.lora_B, self.groups, adapter.scaling)
        delta = enabled.new_zeros(self.out_features, self.in_features).index_copy(0, self.enabled_columns, enabled)
        return delta.T if self.fan_in_fan_out else delta


class Embedding(LoraLayer):
    """LoRA on nn.Embedding: A (r × num_embeddings) is looked up by id, B (dim × r) projects."""

    def adapter_shapes(self, r: int):
        return (r, self.base_layer.num_embeddings), (self.base_layer.embedding_dim, r)

    def init_pair(self, lora_A: Tensor, lora_B: Tensor, init: bool | str) -> None:
        LF.init_embedding_pair(lora_A, lora_B, init)

    def lora_delta(self, ids: Tensor, adapter: LoraAdapter) -> Tensor:
        return LF.embedding_delta(ids, adapter.lora_A, adapter.lora_B, adapter.scaling,
                                  self.base_layer.padding_idx)

    def fused_forward(self, ids: Tensor, adapter: LoraAdapter) -> Tensor | None:
        """base(ids) + s · A[:, ids]ᵀ Bᵀ as one addmm: no out-sized temporaries for B(·), ·s and +."""
        result = self.base_layer(ids)
        if not _same_dtype_no_autocast(result, result, adapter):
            return result + self.lora_delta(ids, adapter).to(result.dtype)
        after_A = F.embedding(ids.reshape(-1), adapter.lora_A.T, padding_idx=self.base_layer.padding_idx)  # (N, r)
        return torch.addmm(result.view(-1, result.shape[-1]), after_A, adapter.lora_B.T,
                           alpha=adapter.scaling).view_as(result)

    def delta_weight(self, adapter: LoraAdapter) -> Tensor:
        return LF.embedding_delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)


class Conv2d(LoraLayer):
    """LoRA on nn.Conv2d: A is a conv with the base kernel and stride, B a 1×1 conv."""

    def adapter_shapes(self, r: int):
        base = self.base_layer
        if base.groups != 1:
            raise ValueError(f"Conv2d with groups={base.groups} is not supported: expected groups=1")
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)

    def lora_delta(self, x: Tensor, adapter: LoraAdapter) -> Tensor:
        x = adapter.dropped(x).to(adapter.lora_A.dtype)
        return LF.conv2d_delta(x, adapter.lora_A, adapter.lora_B, adapter.scaling, self.base_layer)

    def fused_forward(self, x: Tensor, adapter: LoraAdapter) -> Tensor | None:
        """One `LoraConv2dFunction` node for a plain zero-padded conv on a batch (n, in, h, w)."""
        base = self.base_layer
        if not (_runs_own_forward(base, nn.Conv2d.forward) and base.padding_mode == "zeros"
                and not isinstance(base.padding, str) and x.dim() == 4
                and _same_dtype_no_autocast(x, base.weight, adapter)):
            return None
        return LF.lora_conv2d(x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                              base.stride, base.padding, base.dilation, adapter.dropout_now())

    def delta_weight(self, adapter: LoraAdapter) -> Tensor:
        return LF.conv2d_delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a classifier head): the original plus one copy per adapter.

    The copy of the active adapter runs; with no active copy (or adapters
    disabled) the untouched original runs. `unload` puts the original back.
    """

    def __init__(self, original_module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.state = state

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def active_module(self) -> nn.Module:
        state = self.state
        if not state.disabled and state.active in self.modules_to_save:
            return self.modules_to_save[state.active]
        return self.original_module

    def forward(self, *args, **kwargs):
        routing = batching.active_routing(self.state)
        if routing is not None:  # a mixed-adapter batch: each sample its own copy
            return batching.mixed_saved_forward(self, routing, *args, **kwargs)
        return self.active_module()(*args, **kwargs)


def make_lora_layer(base: nn.Module, state: AdapterState, fan_in_fan_out: bool,
                    enable_lora: list[bool] | None) -> LoraLayer:
    """The one place that maps a base layer's type to its LoRA class."""
    if isinstance(base, (nn.Linear, Conv1D)):
        if enable_lora is not None:
            return MergedLinear(base, state, enable_lora, fan_in_fan_out)
        return Linear(base, state, fan_in_fan_out)
    if isinstance(base, nn.Embedding):
        return Embedding(base, state)
    if isinstance(base, nn.Conv2d):
        return Conv2d(base, state)
    raise ValueError(
        f"module of type {type(base).__name__} cannot take LoRA: expected nn.Linear, transformers Conv1D, "
        "nn.Embedding or nn.Conv2d"
    )


SUPPORTED_BASE_TYPES = (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d)
