"""Plain LoRA: h = base(x) + B(A(dropout(x)))·s, merged as W + ΔW."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ..layers.base import LoraLayer


class PlainLora:
    """ΔW = B·A·s added to the base: the layer kind's own `lora_term` and `delta_weight`."""

    name = "lora"
    mixed_batches = True
    combinable = True

    def create(self, layer: "LoraLayer", adapter: str) -> None:
        pass

    def delete(self, layer: "LoraLayer", adapter: str) -> None:
        pass

    def forward(self, layer: "LoraLayer", adapter: str, x: Tensor, result: Tensor) -> Tensor:
        return result + layer.lora_term(x, adapter).to(result.dtype)

    def fast_forward(self, layer: "LoraLayer", adapter: str, x: Tensor) -> Tensor | None:
        return None  # each layer kind runs plain LoRA's fused path itself (layer.fast_forward)

    def merged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        return weight + layer.delta_weight(adapter).to(weight.dtype)

    def unmerged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        return weight - layer.delta_weight(adapter).to(weight.dtype)


PLAIN_LORA = PlainLora()
