"""LoRA variants: what one adapter computes on one layer, beyond its layer kind's A and B.

A variant is a small stateless object. The layer holds the parameters under
PEFT's names; the variant says how they turn into an output term (given x and
the base output), into a merged weight (given W), and which extra parameters
it owns. Merge, unmerge, mixed batches and add_weighted_adapter go through it.
Plain LoRA (`variants/lora.py`) is the first; a new variant is one module here
plus one line in `variant_for`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from ..config import LoraConfig
from .dora import DORA
from .lora import PLAIN_LORA

if TYPE_CHECKING:
    from ..layers.base import LoraLayer


class Variant(Protocol):
    name: str
    mixed_batches: bool  # whether one mixed-adapter batch can run it beside other adapters
    combinable: bool  # whether add_weighted_adapter can combine it

    def create(self, layer: "LoraLayer", adapter: str) -> None:
        """Create the variant's own parameters on `layer` (after A and B exist)."""

    def delete(self, layer: "LoraLayer", adapter: str) -> None:
        """Remove them again."""

    def forward(self, layer: "LoraLayer", adapter: str, x: Tensor, result: Tensor) -> Tensor:
        """The layer's output with this adapter, given its input x and the output so far."""

    def fast_forward(self, layer: "LoraLayer", adapter: str, x: Tensor) -> Tensor | None:
        """The layer's whole output as one fused computation (peftlite.fast), or None where none applies."""

    def merged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        """The base weight with this adapter folded in (a new tensor)."""

    def unmerged_weight(self, layer: "LoraLayer", adapter: str, weight: Tensor) -> Tensor:
        """The inverse of merged_weight."""


def variant_for(config: LoraConfig) -> Variant:
    """The variant an adapter with `config` uses."""
    return DORA if config.use_dora else PLAIN_LORA
