"""One adapter on one layer as one record, and PEFT's per-layer dicts (`layer.r`, `layer.scaling`) as views of it.

PEFT keeps r, alpha, scaling and the variant in parallel dicts keyed by adapter
name; here they are one `LoraAdapter` per name, so adding, deleting or switching
is one dict operation, and `RecordView` gives PEFT's dict-shaped access to them.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..variants import Variant


@dataclass(eq=False)
class LoraAdapter:
    """One adapter on one layer: its fixed hyperparameters and the variant that computes it."""

    r: int
    lora_alpha: float
    scaling: float
    variant: "Variant"
    merge_weights: bool = False
    lora_bias: bool = False  # B has a trainable bias (PEFT's lora_bias): lora_B[name].bias, merged into the base bias


class RecordView(MutableMapping):
    """`layer.r`, `layer.lora_alpha`, `layer.scaling` as PEFT's dicts, read from and written to the records."""

    def __init__(self, records: dict[str, LoraAdapter], attribute: str) -> None:
        self._records, self._attribute = records, attribute

    def __getitem__(self, name: str) -> Any:
        return getattr(self._records[name], self._attribute)

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self._records[name], self._attribute, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"delete adapter {name!r} with delete_adapter, not through layer.{self._attribute}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return repr(dict(self))
