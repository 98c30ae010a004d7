"""LoRA on linear layers: nn.Linear, transformers' Conv1D, and fused projections (MergedLinear).

lora_A[name] is an nn.Linear(in, r) and lora_B[name] an nn.Linear(r, out), both
without bias, as in PEFT: A's weight is (r, in), B's (out, r).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import fast, inits
from .. import functional as LF
from .base import AdapterState, LoraLayer


def linear_features(base: Any) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight in × out)."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


class Linear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (whose weight is in × out: fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        # The weight layout is a fact of the base layer: Conv1D stores (in, out), nn.Linear (out, in).
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_features(base_layer)
        self.slices: tuple[tuple[int, int], ...] = ((0, self.out_features),)  # (first column, width) per group

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def init_factors(self, name: str, init: bool | str) -> None:
        """PEFT's inits; PiSSA/OLoRA also replace the base weight by its residual (W − s·B·A)."""
        lora_A, lora_B = self.factors(name)
        record, weight = self.adapters[name], self.weight
        with torch.no_grad():
            if init == "orthogonal":
                start_A, start_B = inits.orthogonal(record.r, self.in_features, self.out_features)
                lora_A.copy_(start_A.to(weight.dtype))
                lora_B.copy_(start_B.to(weight.dtype))
            elif inits.mutates_base(init):
                oriented = weight.float().T if self.fan_in_fan_out else weight.float()  # (out, in)
                start_A, start_B, residual = inits.data_init(str(init), oriented, record.r, record.scaling)
                lora_A.copy_(start_A)
                lora_B.copy_(start_B)
                weight.copy_(residual.T if self.fan_in_fan_out else residual)
            else:
                LF.init_lora_pair(lora_A, lora_B, init)
            bias = getattr(self.lora_B[name], "bias", None)
            if bias is not None and init is False:  # nn.Linear's own bias init, as PEFT leaves it
                nn.init.uniform_(bias, -record.r ** -0.5, record.r ** -0.5)

    def check_init(self, init: bool | str, r: int) -> None:
        """PEFT's data inits need a float nn.Linear/Conv1D weight; orthogonal an even rank."""
        if init in (True, False, "gaussian"):
            return
        weight = self.weight
        if type(self) is not Linear or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"init_lora_weights={init!r} needs a float nn.Linear or Conv1D base (as in PEFT), "
                             f"got {type(self).__name__} over {type(self.base_layer).__name__} {weight.dtype}")
        if init == "orthogonal" and r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")

    def takes_lora_bias(self) -> bool:
        return type(self) is Linear

    def delta_weight(self, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        return LF.linear_delta_weight(lora_A, lora_B, self.adapters[name].scaling, self.fan_in_fan_out)

    def stacks_in_mixed_batch(self) -> bool:
        return not any(record.lora_bias for record in self.adapters.values())

    def fast_forward(self, x: Tensor, name: str) -> Tensor | None:
        """One fused node (peftlite.fast.linear): x saved once, dropout kept as bits, B·A added in the GEMM."""
        lora_A, lora_B = self.factors(name)
        record = self.adapters[name]
        if record.variant.name != "lora":
            return record.variant.fast_forward(self, name, x)
        if record.lora_bias or not fast.linear_applies(self.base_layer, x, lora_A, lora_B):
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        base = self.base_layer
        return fast.lora_linear(x, base.weight, base.bias, lora_A, lora_B, record.scaling,
                                self.fan_in_fan_out, self.slices, p)


class MergedLinear(Linear):
    """LoRA on a fused projection (e.g. QKV) where only some equal output slices adapt.

    enable_lora [True, False, True] on out = 3·d: slices 0 and 2 get a rank-r update
    each, computed together as one grouped op; slice 1 gets exactly zero. In memory
    lora_A[name] is nn.Linear(in, groups·r) and lora_B[name] nn.Linear(r, groups·out_slice),
    loralib's layout.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, enable_lora: list[bool]) -> None:
        super().__init__(base_layer, state)
        if self.out_features % len(enable_lora):
            raise ValueError(f"enable_lora={enable_lora!r} has {len(enable_lora)} slices, which does not divide "
                             f"the fused output size {self.out_features}")
        self.enable_lora = list(enable_lora)
        self.groups = sum(enable_lora)
        slice_size = self.out_features // len(enable_lora)
        self.slices = tuple((i * slice_size, slice_size) for i, on in enumerate(enable_lora) if on)
        columns = [i * slice_size + j for i, on in enumerate(enable_lora) if on for j in range(slice_size)]
        self.enabled_columns: Tensor
        self.register_buffer("enabled_columns", torch.tensor(columns, device=self.base_layer.weight.device),
                             persistent=False)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r * self.groups, self.in_features), (len(self.enabled_columns), r)

    def stacks_in_mixed_batch(self) -> bool:
        return False

    def lora_term(self, x: Tensor, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        delta = LF.grouped_delta(self.lora_input(x, name), lora_A, lora_B, self.groups, self.adapters[name].scaling)
        return delta.new_zeros(*delta.shape[:-1], self.out_features).index_copy(-1, self.enabled_columns, delta)

    def delta_weight(self, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        enabled = LF.grouped_delta_weight(lora_A, lora_B, self.groups, self.adapters[name].scaling)
        delta = enabled.new_zeros(self.out_features, self.in_features).index_copy(0, self.enabled_columns, enabled)
        return delta.T if self.fan_in_fan_out else delta

