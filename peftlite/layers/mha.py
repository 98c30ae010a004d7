"""LoRA on nn.MultiheadAttention: its fused in_proj and its out_proj, as PEFT 0.21 does it.

torch's MultiheadAttention computes with `in_proj_weight` (3·E, E) and
`out_proj.weight` (E, E) directly, never through a submodule's forward, so
LoRA cannot be added to an output there. As in PEFT, the layer holds

    lora_A[name] (r, E), lora_B[name] (3·E, r)   on in_proj_weight,
    base_layer.out_proj: a LoRA Linear with its own pair (r, E), (E, r),

(PEFT's in-memory names and file keys: `<path>.lora_A.weight` and
`<path>.base_layer.out_proj.lora_A.weight`), and runs the module with
W_in + ΔW_in and W_out + ΔW_out substituted for the one call
(torch.func.functional_call), where PEFT merges and unmerges around it.

PEFT 0.21.2 adds out_proj's update twice: its merge adds ΔW_out into the
weight, then merges the out_proj layer, which adds it again through `.data`
(outside autograd). So in forward and merge an adapter PEFT trained on this
layer means W_out + 2·ΔW_out, and training sees the gradient of one ΔW_out.
This layer keeps both (`OutProj` merges 2·ΔW_out; forward uses
W_out + ΔW_out + ΔW_out.detach()), so files, outputs and gradients match PEFT.
The out_proj layer is a second LoRA layer of the model: it is planned,
installed, merged and saved like any other (tuner/inject.py plans it with
this one). Query, key and value must share one embedding size, as in PEFT.
Mixed-adapter batches are refused, as PEFT refuses them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from .. import functional as LF
from .base import AdapterState, LoraLayer
from .linear import Linear
from .mixed import active_routing


class OutProj(Linear):
    """nn.MultiheadAttention's out_proj with LoRA: ΔW_out counted twice, as PEFT 0.21.2 applies it."""

    def delta_weight(self, name: str) -> Tensor:
        return 2 * super().delta_weight(name)

    def lora_term(self, x: Tensor, name: str) -> Tensor:
        return 2 * super().lora_term(x, name)

    def fast_forward(self, x: Tensor, name: str) -> Tensor | None:
        return None

    def pattern_key(self, key: str) -> str:
        """The nn.MultiheadAttention's path: PEFT builds out_proj's LoRA with the r and alpha rank_pattern and
        alpha_pattern give the attention module, and matches no pattern against out_proj itself."""
        return key.removesuffix(".base_layer.out_proj")


class MultiheadAttention(LoraLayer):
    """LoRA on nn.MultiheadAttention's in_proj (here) and out_proj (`out_layer`, at base_layer.out_proj)."""

    def __init__(self, base_layer: nn.MultiheadAttention, state: AdapterState) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim other than embed_dim cannot take LoRA (nor in "
                             "PEFT): expected query, key and value of one embedding size")
        super().__init__(base_layer, state)
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        out_proj = base_layer.out_proj
        # a list, so the layer is not registered here too: it lives at base_layer.out_proj once installed
        self._out_layer = [out_proj if isinstance(out_proj, OutProj) else OutProj(out_proj, state)]

    @property
    def out_layer(self) -> "OutProj":
        """The LoRA layer for out_proj, installed at base_layer.out_proj with this one (tuner/inject.py)."""
        return self._out_layer[0]

    @property
    def weight(self) -> Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.in_proj_bias

    def base_weight_reference(self) -> Tensor:
        return self.base_layer.in_proj_weight

    def merge_target(self) -> Tensor:
        return self.base_layer.in_proj_weight

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def init_factors(self, name: str, init: bool | str) -> None:
        LF.init_lora_pair(*self.factors(name), init)

    def delta_weight(self, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        return LF.linear_delta_weight(lora_A, lora_B, self.adapters[name].scaling, False)

    def lora_term(self, x: Tensor, name: str) -> Tensor:
        raise ValueError("LoRA on nn.MultiheadAttention changes its weights, it adds no separate output term")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if active_routing(self.state) is not None:
            raise ValueError("nn.MultiheadAttention with LoRA takes no mixed-adapter batches (nor in PEFT): call "
                             "the model without adapter_names")
        out_layer = self.base_layer.out_proj
        in_names = self.running_adapters()
        out_names = out_layer.running_adapters() if isinstance(out_layer, LoraLayer) else []
        if not in_names and not out_names:
            return self.base_layer(x, *args, **kwargs)
        weights: dict[str, Tensor] = {}
        if in_names:
            in_weight: Tensor = self.base_layer.in_proj_weight
            weights["in_proj_weight"] = in_weight + sum(self.delta_weight(n).to(in_weight.dtype) for n in in_names)
        if out_names:
            out_weight: Tensor = out_layer.base_layer.weight
            for n in out_names:  # PEFT's W_out + 2·ΔW_out, differentiable through one ΔW_out (see above)
                delta = Linear.delta_weight(out_layer, n).to(out_weight.dtype)
                out_weight = out_weight + delta + delta.detach()
            weights["out_proj.base_layer.weight"] = out_weight
        return functional_call(self.base_layer, weights, (x, *args), kwargs)
