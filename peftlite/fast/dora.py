"""The fused training path for DoRA on linear layers: gain, base GEMM and low-rank term in one autograd node.

DoRA's output (no dropout, the norm detached) is h = g ⊙ (x Wᵀ + s·u Bᵀ) + b with
u = x Aᵀ and the gain g = m / ‖W + s·B·A‖ per output row (`variants/dora.py`
makes g; the gradient of g reaches m through ordinary autograd). The reference
writes z = x Wᵀ + s·u Bᵀ and then g ⊙ z + b: two more passes over the output
and, in backward, G ⊙ g and z again. Here g goes where it is cheapest:
into the rows of W + s·B·A when the weight is folded, into the rows of B
for the gradients of A and B, and onto the output once when it is not folded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import folded_weight, folding_pays, row_blocks


def _scaled_folded_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, gain: Tensor,
                          fan_in_fan_out: bool, folded: Tensor | None = None) -> Tensor:
    """g ⊙ (W + s·B·A), rows scaled: (out, in); `folded`, W + s·B·A formed already, is scaled in place."""
    if folded is None:
        folded = folded_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    return folded.mul_(gain.unsqueeze(1))


def dora_folds(x: Tensor, weight: Tensor, fan_in_fan_out: bool) -> bool:
    """Whether `dora_linear` folds for this input: as for a weight made afresh (`folding_pays(...,
    fresh_weight=True)`), since scaling W's rows by g needs a new out × in tensor either way; fp32/64 only."""
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    return (weight.dtype in (torch.float32, torch.float64)
            and folding_pays(x.numel() // max(in_features, 1), in_features, out_features, fresh_weight=True))


def _gain_grad(grad_out: Tensor, out: Tensor, gain: Tensor, bias: Tensor | None) -> Tensor:
    """∂L/∂g_j = Σ_t G_tj z_tj with z = (h − b) / g, from the saved output h: (Σ_t G_tj h_tj − b_j Σ_t G_tj) / g_j.

    G ⊙ h is formed a block of rows at a time in one reused buffer that stays in cache; whole, it
    would be a fresh out-sized tensor each step, its pages faulted in on first touch.
    """
    dot = grad_out.new_zeros(gain.shape)  # (out,)
    blocks = row_blocks(grad_out)
    buffer = grad_out.new_empty(blocks[0].stop, grad_out.shape[1])
    for rows in blocks:
        dot += torch.mul(grad_out[rows], out[rows], out=buffer[:rows.stop - rows.start]).sum(0)
    if bias is not None:
        dot -= bias * grad_out.sum(0)
    return dot.div_(gain)


class DoraLinearFunction(torch.autograd.Function):
    """h = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b for a frozen linear base, x (N, in), W (out, in) — (in, out) when
    fan_in_fan_out —, A (r, in), B (out, r), g and b (out,).

    Forward, folded:   W'' = g ⊙ (W + s·B·A), h = x W''ᵀ + b; u = x Aᵀ kept for ∂L/∂B
             unfolded: h = (x Wᵀ + s·u Bᵀ) ⊙ g + b, written in place into one output tensor
    Backward, with G = ∂L/∂h and B_g = g ⊙ B (rows scaled, out × r):
              ∂L/∂u = s · G B_g             (N, r)
              ∂L/∂B = s · g ⊙ (Gᵀ u)        (out, r)
              ∂L/∂A = (∂L/∂u)ᵀ x            (r, in)
              ∂L/∂x = G W'' (folded) or ∂L/∂u A + (G ⊙ g) W
              ∂L/∂g = Σ_t G_t ⊙ (h_t − b) / g
    Saved: x, u, and h. The layers after q, k, v, gate and up keep h themselves (attention, the
    activation, the gate product), so it costs memory only where a residual add follows.
    g must have no zero (the caller checks): z is recovered from h by dividing by it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                gain: Tensor, scaling: float, fan_in_fan_out: bool, fold: bool, folded: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        u = x2 @ lora_A.t()  # (N, r)
        if fold:
            out = F.linear(x2, _scaled_folded_weight(weight, lora_A, lora_B, scaling, gain, fan_in_fan_out, folded),
                           bias)
        else:
            out = u @ (lora_B.t() * scaling)  # (N, out); the base GEMM adds x Wᵀ into it
            out.addmm_(x2, weight if fan_in_fan_out else weight.t()).mul_(gain)
            if bias is not None:
                out.add_(bias)
        need_x, need_gain = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        ctx.save_for_backward(x, weight if need_x else None, bias, lora_A, lora_B, gain, u,
                              out if need_gain else None)
        ctx.scaling, ctx.fan_in_fan_out, ctx.fold, ctx.x_shape = scaling, fan_in_fan_out, fold, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        x, weight, bias, lora_A, lora_B, gain, u, out = ctx.saved_tensors
        need_x, _, need_b, need_A, need_B, need_gain = ctx.needs_input_grad[:6]
        s, g = ctx.scaling, grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_b = grad_A = grad_B = grad_gain = None
        g_u = g @ (lora_B * gain.unsqueeze(1)).mul_(s)  # (N, r)
        if need_B:
            grad_B = (g.t() @ u).mul_(gain.unsqueeze(1)).mul_(s)
        if need_A:
            grad_A = (x2.t() @ g_u).t()  # (r, in), formed as (x2ᵀ ∂L/∂u)ᵀ as in LoraLinearFunction
        if need_x:
            if ctx.fold:
                grad_x = g @ _scaled_folded_weight(weight, lora_A, lora_B, s, gain, ctx.fan_in_fan_out)
            else:
                grad_x = (g_u @ lora_A).addmm_(g * gain, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x = grad_x.view(ctx.x_shape)
        if need_gain:
            grad_gain = _gain_grad(g, out, gain, bias)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, None, grad_b, grad_A, grad_B, grad_gain, None, None, None, None


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, gain: Tensor,
                scaling: float, fan_in_fan_out: bool = False, fold: bool | None = None,
                folded: Tensor | None = None) -> Tensor:
    """g ⊙ (base(x) − b + s·B(A(x))) + b for a frozen linear base, through `DoraLinearFunction`.

    x (..., in) -> (..., out); gain (out,) without zeros. `fold` None decides by `dora_folds`.
    `folded`: W + s·B·A if the caller formed it already (for the norm); it is then scaled in place.
    """
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    fold = dora_folds(x, weight, fan_in_fan_out) if fold is None else fold and weight.dtype in (torch.float32,
                                                                                                  torch.float64)
    folded = folded if fold else None
    if not torch.is_grad_enabled():  # inference: nothing to save
        if fold:
            return F.linear(x, _scaled_folded_weight(weight, lora_A, lora_B, scaling, gain, fan_in_fan_out, folded),
                            bias)
        out = F.linear(F.linear(x, lora_A), lora_B * scaling)
        out.view(-1, out_features).addmm_(x.reshape(-1, in_features), weight if fan_in_fan_out else weight.t())
        return out.mul_(gain) if bias is None else out.mul_(gain).add_(bias)
    return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, gain, scaling, fan_in_fan_out, fold, folded)
