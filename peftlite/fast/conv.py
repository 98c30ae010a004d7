"""The fused training path for Conv2d: the twin of `linear.py` for a plain zero-padded convolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import as_bytes, draw_dropout_mask


class LoraConv2dFunction(torch.autograd.Function):
    """Base conv plus the low-rank term in one autograd node: the Conv2d twin of LoraLinearFunction.

    Shapes: x (n, in, h, w), W (out, in, kh, kw), A (r, in, kh, kw) with W's stride, padding and
    dilation, B (out, r, 1, 1), c = 1/(1 - p), M the dropout keep-mask.
    Forward:  u = c · conv(x ⊙ M, A)                       (n, r, h', w')
              y = conv(x, W) + b + s · conv1×1(u, B)       (n, out, h', w')
    Backward, with G = ∂L/∂y and conv_x / conv_w the gradients of a convolution with respect to
    its input / weight (aten.convolution_backward):
              ∂L/∂u = s · conv1×1_x(G, B);   ∂L/∂B = s · conv1×1_w(u, G)
              ∂L/∂A = conv_w(x ⊙ M, c · ∂L/∂u)
              ∂L/∂x = conv_x(G, W) + M ⊙ conv_x(c · ∂L/∂u, A)
    Saved: x (no dropped copy), the bool mask, u.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                dropout: float) -> Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation)
        mask = draw_dropout_mask(x, dropout) if dropout > 0 else None
        u = F.conv2d(x if mask is None else x * as_bytes(mask), lora_A, None, stride, padding, dilation)
        if mask is not None:
            u.mul_(1 / (1 - dropout))
        out.add_(F.conv2d(u, lora_B), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, mask)
        ctx.conv = (list(stride), list(padding), list(dilation))
        ctx.scaling, ctx.dropout, ctx.has_bias = scaling, dropout, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_A, lora_B, u, mask = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        stride, padding, dilation = ctx.conv
        s, c = ctx.scaling, 1 / (1 - ctx.dropout)

        def conv_backward(grad, inp, kernel, stride, padding, dilation, mask_out, bias_sizes=None):
            return torch.ops.aten.convolution_backward(grad, inp, kernel, bias_sizes, stride, padding, dilation,
                                                       False, [0, 0], 1, mask_out)

        grad_u, grad_B, _ = conv_backward(grad_out, u, lora_B, [1, 1], [0, 0], [1, 1], [True, need_B, False])
        grad_u = grad_u * (s * c if mask is not None else s)
        grad_B = grad_B.mul_(s) if need_B else None
        x_in = x if mask is None else x * as_bytes(mask)
        lora_grad_x, grad_A, _ = conv_backward(grad_u, x_in, lora_A, stride, padding, dilation, [need_x, need_A, False])
        grad_x: Any = None
        grad_W = grad_b = None
        if need_x or need_W or need_b:
            grad_x, grad_W, grad_b = conv_backward(grad_out, x, weight, stride, padding, dilation,
                                                   [need_x, need_W, need_b],
                                                   bias_sizes=[weight.shape[0]] if ctx.has_bias else None)
        if need_x:
            grad_x = grad_x.add_(lora_grad_x) if mask is None else grad_x.addcmul_(lora_grad_x, as_bytes(mask))
        return grad_x, grad_W, grad_b, grad_A, grad_B, None, None, None, None, None


def lora_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                dropout: float = 0.0) -> Tensor:
    """conv(x, W) + b + B(A(dropout(x)))·s through `LoraConv2dFunction`; x (n, in, h, w), zero padding given as ints."""
    return LoraConv2dFunction.apply(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, dropout)
