"""Trainable tokens: a few rows of an embedding (or of a tied output layer) train in full, as PEFT's
`trainable_token_indices`.

In memory this is PEFT's layout, so state_dict keys match:
`<path>.token_adapter.base_layer` is the original module,
`<path>.token_adapter.trainable_tokens_delta[name]` (len(ids), dim) holds adapter
`name`'s rows, `trainable_tokens_original[name]` (a non-persistent buffer) the base
rows they replace, and `token_indices[name]` the ids. Despite PEFT's name the
"delta" is the new rows themselves, not a difference: it starts as a copy of the
original rows, and forward swaps rows in with `index_copy` (W' = W with rows ids
replaced), so a base model whose other rows change later still gets these rows.

An output layer tied to the embedding (GPT-2's lm_head) gets a layer that shares the
embedding layer's containers (PEFT's `tied_adapter`): one set of rows trains both.
Which adapters run is read from the model's `AdapterState`, like every LoRA layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterState
from .mixed import active_routing


class BufferDict(nn.Module):
    """{adapter name: tensor} as non-persistent buffers: moved with the model, never in its state_dict."""

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def keys(self) -> list[str]:
        return list(self._buffers)


class TrainableTokensLayer(nn.Module):
    """Rows `token_indices[name]` of `base_layer.weight` (an nn.Embedding, or an nn.Linear head whose
    rows are output tokens) replaced by the trainable `trainable_tokens_delta[name]`."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    base_layer: Any  # an nn.Embedding or nn.Linear

    def __init__(self, base_layer: nn.Module, state: AdapterState,
                 tied_adapter: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []  # a list: not a submodule
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = BufferDict()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same containers: the tied layer reads and trains the embedding layer's rows
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        self.merged_adapters: list[str] = []

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        return self._tied_adapter[0] if self._tied_adapter else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapters(self) -> list[str]:
        return list(self.trainable_tokens_delta.keys())

    @property
    def active_adapters(self) -> list[str]:
        return [name for name in self.state.active if name in self.trainable_tokens_delta]

    @property
    def disable_adapters(self) -> bool:
        return self.state.disabled

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # ---- adapters ---------------------------------------------------------------------------------
    def update_layer(self, name: str, token_indices: list[int], dtype: torch.dtype | None = None,
                     trainable: bool = True) -> None:
        """Adapter `name` over rows `token_indices` (checked by the caller), starting as their current values.

        A tied layer adds nothing: it reads the containers of the layer it is tied to.
        """
        if self.tied_adapter is not None:
            return
        weight = self.base_layer.weight
        originals = weight.detach()[torch.tensor(token_indices, dtype=torch.long, device=weight.device)]
        originals = originals.to(dtype or weight.dtype)  # (len(ids), dim)
        self.token_indices[name] = list(token_indices)
        self.trainable_tokens_delta[name] = nn.Parameter(originals.clone(), requires_grad=trainable)
        self.trainable_tokens_original[name] = originals.clone()

    def delete_adapter(self, name: str) -> None:
        if self.tied_adapter is None and name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
            del self.trainable_tokens_original[name]
            del self.token_indices[name]

    def running_adapters(self) -> list[str]:
        """Adapters whose rows forward swaps in: active, on this layer, not merged, not disabled."""
        if self.state.disabled:
            return []
        return [name for name in self.active_adapters if name not in self.merged_adapters]

    # ---- the weight with the rows swapped in --------------------------------------------------------
    def _with_rows(self, weight: Tensor, names: list[str], source: str = "trainable_tokens_delta") -> Tensor:
        """`weight` (rows, dim) with each adapter's rows written over it, in order (out of place)."""
        for name in names:
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            rows = self.trainable_tokens_delta[name] if source == "trainable_tokens_delta" else \
                self.trainable_tokens_original[name]
            weight = weight.index_copy(0, index, rows.to(weight))
        return weight

    def get_merged_weights(self, active_adapters: list[str]) -> Tensor:
        """The base weight with these adapters' rows in it: what forward computes with (PEFT's name)."""
        return self._with_rows(self.base_layer.weight, active_adapters)

    def check_overlap(self, names: list[str]) -> None:
        """PEFT's rule: adapters merged or run together must not share token ids (whose rows would win?)."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            ids = set(self.token_indices[name])
            if seen & ids:
                raise ValueError(f"token ids {sorted(seen & ids)} of adapter {name!r} are already taken by another "
                                 "merged or active adapter on this layer: expected disjoint trainable_token_indices")
            seen |= ids

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write each adapter's rows into the base weight (default: the active ones not merged yet)."""
        names = self.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in self.trainable_tokens_delta]
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        self.check_overlap(names)
        with torch.no_grad():
            merged = self._with_rows(self.base_layer.weight.detach(), names)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapters {names!r} would put NaN or Inf into the "
                                 f"{type(self.base_layer).__name__} weight's token rows; nothing merged")
            self.base_layer.weight.copy_(merged)
        self.merged_adapters += names
        self.state.merged_count += len(names)

    def unmerge(self) -> None:
        """Put the original rows back, last merged first."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_(self._with_rows(weight.detach(), [name], source="trainable_tokens_original"))
                self.state.merged_count -= 1

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        routing = active_routing(self.state)
        if routing is not None:  # a mixed-adapter batch: each sample's rows through its own adapter
            routing.check_input(x)
            out: Tensor | None = None
            for name, rows in routing.groups(x.shape[0], x.device):
                names = [] if self.state.disabled_for_mixed_batch() or name not in self.trainable_tokens_delta \
                    or self.merged else [name]
                part = self._forward_with(x[rows] if isinstance(rows, slice) else x.index_select(0, rows), names)
                out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
                out[rows] = part
            assert out is not None
            return out
        names = self.running_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            self.check_overlap(names)
        return self._forward_with(x, names)

    def _forward_with(self, x: Tensor, names: list[str]) -> Tensor:
        """The base layer's output computed with these adapters' rows swapped into its weight."""
        base = self.base_layer
        if not names:
            return base(x)
        weight = self.get_merged_weights(names)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma 3) scale in their own forward
            return out if scale is None else out * torch.as_tensor(scale).to(out)
        return F.linear(x, weight, base.bias)


class TrainableTokensWrapper(nn.Module):
    """What sits at the module's path: PEFT's `TrainableTokensWrapper`, holding `token_adapter`.

    `weight` reads the base weight with the active adapter's rows in it, as PEFT's
    wrapper does (code that reads `model.get_input_embeddings().weight`).
    """

    def __init__(self, module: nn.Module, state: AdapterState, tied_adapter: TrainableTokensLayer | None = None
                 ) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, state, tied_adapter)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> Tensor:
        layer = self.token_adapter
        return layer.get_merged_weights(layer.running_adapters())

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.token_adapter(x, *args, **kwargs)
