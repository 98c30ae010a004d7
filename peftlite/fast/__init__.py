"""The fused training path, and the one place that decides where it applies.

A LoRA layer's reference forward is base(x) + B(A(dropout(x)))·s, in a few
lines of torch. On the layers below, when the model's `fast` switch is on
(the default; `LoraModel.use_fast_path(False)` or PEFTLITE_FAST_PATH=0 turn it
off), forward runs one fused autograd node instead: it saves x once, never
stores the dropped-out input, and lets the base GEMM add into the low-rank
term (`linear.py`, `conv.py`; over a 4-bit base, W is dequantized inside the
node). DoRA on a linear base has a node of its own (`dora.py`). Dropout masks
then come from `masks.py`, not from nn.Dropout: same distribution, other bits.
LoRA on MoE experts' parameters runs the experts module itself, one node per
projection over the routed tokens only (`experts.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .conv import lora_conv2d
from .dora import dora_folds, dora_linear
from .experts import AutogradInput, ExpertsInput, SwiGLU, routed_experts_forward
from .linear import folded_weight, lora_linear

try:  # transformers 5: experts modules with 3-D parameters and a default gate
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # earlier: no such modules, so `experts_applies` is never true
    SiLUActivation, _default_apply_gate = nn.SiLU, None  # type: ignore[misc, assignment]

__all__ = ["linear_applies", "packed_linear_applies", "conv2d_applies", "embedding_applies", "experts_applies",
           "lora_linear", "dora_linear", "dora_folds", "folded_weight", "lora_conv2d", "lora_embedding",
           "experts_gate", "routed_experts_forward"]

# The parameters a transformers experts module's own forward reads, by role.
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def _runs_own_forward(base: nn.Module, *forwards: object) -> bool:
    """Whether calling `base` would run exactly one of `forwards`: no subclass override, no hooks."""
    return (type(base).forward in forwards and "forward" not in base.__dict__
            and not base._forward_hooks and not base._forward_pre_hooks)


def _same_dtype_no_autocast(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """No casts needed (else the reference path casts, as PEFT does)."""
    return (x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype
            and not torch.is_autocast_enabled(x.device.type))


def packed_linear_applies(base: Any, own_forward: object, x: Tensor, lora_A: Tensor, lora_B: Tensor,
                          dense_dtype: torch.dtype) -> bool:
    """Whether `lora_linear(..., dense=...)` computes what a quantized layer's `own_forward` plus the term would.

    Training only: in inference a quantized layer runs a kernel of its own on its packed weight.
    The layer computes in x's dtype (no compute_dtype cast), and so do its bias and `dense`.
    """
    bias = base.bias
    return (torch.is_grad_enabled() and _runs_own_forward(base, own_forward)
            and getattr(base, "compute_dtype", None) in (None, x.dtype) and (bias is None or bias.dtype == x.dtype)
            and x.dtype == dense_dtype == lora_A.dtype == lora_B.dtype and not torch.is_autocast_enabled(x.device.type))


def linear_applies(base: Any, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether `lora_linear` computes exactly what the reference would for this nn.Linear / Conv1D."""
    return (type(base) in (nn.Linear, Conv1D) and _runs_own_forward(base, nn.Linear.forward, Conv1D.forward)
            and _same_dtype_no_autocast(x, base.weight, lora_A, lora_B))


def conv2d_applies(base: Any, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether `lora_conv2d` applies: a plain zero-padded nn.Conv2d on a batch (n, in, h, w)."""
    return (type(base) is nn.Conv2d and _runs_own_forward(base, nn.Conv2d.forward)
            and base.padding_mode == "zeros" and not isinstance(base.padding, str) and x.dim() == 4
            and base.groups == 1 and _same_dtype_no_autocast(x, base.weight, lora_A, lora_B))


def embedding_applies(result: Tensor, lora_A: Tensor, lora_B: Tensor) -> bool:
    return _same_dtype_no_autocast(result, result, lora_A, lora_B)


def lora_embedding(result: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                   padding_idx: int | None) -> Tensor:
    """base(ids) + s · A[:, ids]ᵀ Bᵀ as one addmm: no out-sized temporaries for B(·), ·s and +."""
    after_A = F.embedding(ids.reshape(-1), lora_A.T, padding_idx=padding_idx)  # (N, r)
    return torch.addmm(result.view(-1, result.shape[-1]), after_A, lora_B.T, alpha=scaling).view_as(result)


def experts_applies(module: nn.Module, parameters: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `routed_experts_forward` can run `module`: a transformers experts module called as
    (hidden, top_k_index, top_k_weights), with LoRA only on `parameters` its own forward reads."""
    return (all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate"))
            and not getattr(module, "_is_expert_parallel", False) and len(args) == 2 and not kwargs
            and all(name in EXPERT_PARAMETERS for name in parameters))


def experts_gate(experts: Any) -> ExpertsInput:
    """What makes the down projection's input from the up projection's output: `SwiGLU` where the module
    runs transformers' default gate with SiLU, else autograd through its own gate (or activation)."""
    if not experts.has_gate:
        return AutogradInput(experts.act_fn)
    act_fn = getattr(experts, "act_fn", None)
    if (type(experts)._apply_gate is _default_apply_gate and "_apply_gate" not in experts.__dict__
            and act_fn is not None and type(act_fn) in (SiLUActivation, nn.SiLU)
            and _runs_own_forward(act_fn, SiLUActivation.forward, nn.SiLU.forward)):
        return SwiGLU()
    return AutogradInput(experts._apply_gate)
