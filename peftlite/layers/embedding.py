"""LoRA on nn.Embedding: A (r × num_embeddings) is looked up by id, B (dim × r) projects.

PEFT keeps these as plain parameters, `lora_embedding_A[name]` and
`lora_embedding_B[name]`; so do we. Dropout does not apply to ids.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import fast
from .. import functional as LF
from .base import LoraLayer


class Embedding(LoraLayer):
    def check_init(self, init: bool | str, r: int) -> None:
        pass  # as PEFT: every init but False starts an embedding at A = 0, B normal

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.base_layer.num_embeddings), (self.base_layer.embedding_dim, r)

    def create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        shape_A, shape_B = self.factor_shapes(r)
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(shape_A, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(shape_B, dtype=dtype, device=device))

    def init_factors(self, name: str, init: bool | str) -> None:
        LF.init_embedding_pair(self.lora_embedding_A[name], self.lora_embedding_B[name], init)

    def factor_slots(self, name: str) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        return (self.lora_embedding_A, name), (self.lora_embedding_B, name)

    def lora_term(self, ids: Tensor, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        return LF.embedding_delta(ids, lora_A, lora_B, self.adapters[name].scaling, self.base_layer.padding_idx)

    def delta_weight(self, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        return LF.embedding_delta_weight(lora_A, lora_B, self.adapters[name].scaling)

    def fast_forward(self, ids: Tensor, name: str) -> Tensor | None:
        lora_A, lora_B = self.factors(name)
        record = self.adapters[name]
        if record.variant.name != "lora":
            return None
        result = self.base_layer(ids)
        if not fast.embedding_applies(result, lora_A, lora_B):
            return result + self.lora_term(ids, name).to(result.dtype)
        return fast.lora_embedding(result, ids, lora_A, lora_B, record.scaling, self.base_layer.padding_idx)
