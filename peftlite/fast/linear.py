"""The fused training path for linear layers: base GEMM and low-rank term in one autograd node.

Same numbers as the reference (`peftlite.functional`, torch's dropout aside),
less memory and fewer passes over out-sized tensors; tests hold it to the
reference. Dropout masks come from `masks.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import (
    as_bytes,
    keep_mask_blocks,
    mask_from_device_generator,
    mask_rows,
    numpy_serves,
    pack_rows,
)

MASKED_BLOCK_BYTES = 1 << 20


def row_blocks(x2: Tensor) -> list[slice]:
    """x2 (N, in) cut into blocks of rows of about MASKED_BLOCK_BYTES (one block off the CPU)."""
    n, width = x2.shape
    step = n
    if x2.device.type == "cpu":
        step = max(1, min(n, MASKED_BLOCK_BYTES // max(width * x2.element_size(), 1)))
    return [slice(start, min(start + step, n)) for start in range(0, max(n, 1), max(step, 1))]  # one if n = 0


def _apply_mask_in_blocks(mask: Tensor, g_u: Tensor, x2: Tensor | None, grad_x: Tensor | None) -> Tensor | None:
    """Backward's two uses of the dropout mask M, a block of rows at a time, M unpacked once a block.

    Returns ∂L/∂A = g_uᵀ (x2 ⊙ M) (g·r, in) if x2 (N, in) is given, else None; multiplies grad_x
    (N, in), if given, by M in place. x2 ⊙ M is formed in one reused buffer, so the dropped-out
    input never exists whole. In one piece it would be a fresh in-sized tensor for every product,
    which the allocator often hands out as new pages, each faulted in on first touch.
    """
    rows_like = x2 if x2 is not None else grad_x
    assert rows_like is not None, "called with neither x2 nor grad_x"
    blocks, width = row_blocks(rows_like), rows_like.shape[1]
    grad_A = rows_like.new_zeros(width, g_u.shape[1])  # (in, g·r), transposed as in the Function's backward
    buffer = rows_like.new_empty(blocks[0].stop, width)  # the first block is the largest
    for rows in blocks:
        keep = mask_rows(mask, rows, width)
        if x2 is not None:
            grad_A.addmm_(torch.mul(x2[rows], keep, out=buffer[:rows.stop - rows.start]).t(), g_u[rows])
        if grad_x is not None:
            grad_x[rows].mul_(keep)
    return grad_A.t() if x2 is not None else None


def _dropout_product(x2: Tensor, lora_A: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """u = D(x2) Aᵀ = ((x2 ⊙ M) Aᵀ) / (1 - p), (N, g·r), and the mask M to keep for backward.

    The scale is applied at rank r. On CPU each block of rows draws its part of the mask
    (`keep_mask_blocks`), uses it at once and keeps it as bits: the mask never exists whole as
    bools, nor do the draws behind it. Elsewhere the device generator draws the whole bool mask,
    and that is kept.
    """
    blocks = row_blocks(x2)
    buffer = x2.new_empty(blocks[0].stop, x2.shape[1])
    if numpy_serves(x2):
        keeps = keep_mask_blocks(x2, p, blocks)
        kept = x2.new_empty(x2.shape[0], -(-x2.shape[1] // 8), dtype=torch.uint8)  # the bits, 8 to a byte
    else:
        kept = mask_from_device_generator(x2, p)
        keeps = (kept[rows] for rows in blocks)
    u = x2.new_empty(x2.shape[0], lora_A.shape[0])
    for rows, keep in zip(blocks, keeps):
        masked = torch.mul(x2[rows], as_bytes(keep), out=buffer[:rows.stop - rows.start])
        torch.mm(masked, lora_A.t(), out=u[rows])
        if kept.dtype == torch.uint8:
            kept[rows] = pack_rows(keep)
    return u.mul_(1 / (1 - p)), kept


def folding_pays(rows: int, in_features: int, out_features: int, fresh_weight: bool = False) -> bool:
    """Whether a training step is cheaper with ΔW folded into W than with the low-rank products.

    Folded, forming W + ΔW in forward and again in backward costs two passes over an out × in
    weight; unfolded, the rank-r term is written into the output and into ∂L/∂x before the base
    GEMMs add into them, which costs those GEMMs a read of rows × (in + out) more. Folding wins
    only on tall batches; the threshold (8× the harmonic mean of in and out) comes from
    benchmarks/train_step.py. A weight made afresh for each product (`fresh_weight`: a quantized
    base, dequantized in forward and again in backward) takes ΔW in place with no extra pass, so
    folding then costs only the rank-r product B·A against the two it saves: rows · r · (in + out)
    against in · out · r.
    """
    if fresh_weight:
        return rows * (in_features + out_features) > in_features * out_features
    return rows * (in_features + out_features) > 16 * in_features * out_features


def _per_group(parts: list[Tensor], dim: int) -> Tensor:
    """The groups' results side by side (no copy for the usual single group)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _low_rank_output(u: Tensor, lora_B: Tensor, bias: Tensor | None, scaling: float,
                     slices: tuple[tuple[int, int], ...], out_features: int) -> Tensor:
    """b + s · u_k B_kᵀ in each group's columns: (N, out), a new tensor.

    The forward pass writes this first and lets the base GEMM add x Wᵀ into it (beta = 1), where
    the GEMM reads it tile by tile while computing; adding the rank-r term after the GEMM instead
    would be one more pass over the output.
    """
    r = u.shape[1] // len(slices)
    if slices == ((0, out_features),):
        return torch.addmm(bias, u, lora_B.t(), alpha=scaling) if bias is not None else u @ (lora_B.t() * scaling)
    out = bias.expand(u.shape[0], out_features).clone() if bias is not None else u.new_zeros(u.shape[0], out_features)
    for k, (start, size) in enumerate(slices):
        out[:, start:start + size].addmm_(u[:, k * r:(k + 1) * r], lora_B[k * size:(k + 1) * size].t(), alpha=scaling)
    return out


def folded_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool,
                  slices: tuple[tuple[int, int], ...] | None = None, in_place: bool = False) -> Tensor:
    """W + s · B_k A_k in each group's rows (None: one group over all): (out, in); a new tensor unless
    `in_place` (W made afresh)."""
    w = weight.t() if fan_in_fan_out else weight  # (out, in)
    if slices is None or slices == ((0, w.shape[0]),):
        return w.addmm_(lora_B, lora_A, alpha=scaling) if in_place else torch.addmm(w, lora_B, lora_A, alpha=scaling)
    folded, r = (w if in_place else w.clone()), lora_A.shape[0] // len(slices)
    for k, (start, size) in enumerate(slices):
        folded[start:start + size].addmm_(lora_B[k * size:(k + 1) * size], lora_A[k * r:(k + 1) * r], alpha=scaling)
    return folded


class LoraLinearFunction(torch.autograd.Function):
    """Base linear plus the low-rank term of one or more adapter groups, in one autograd node.

    Shapes: x (N, in) after flattening, W (out, in) — (in, out) when fan_in_fan_out —, bias (out,),
    A (g·r, in), B (g·os, r), where g groups each write os output columns starting at
    `slices[k][0]` (a plain Linear is one group covering all columns; fused QKV has one group per
    enabled slice). D is dropout with keep-mask M and p: D(x) = x ⊙ M / (1 - p).

    Forward:  u = D(x) Aᵀ                                     (N, g·r)
              y = b + s · u_k B_kᵀ in cols_k, then y += x Wᵀ  (the base GEMM adds into y: beta = 1)
    Backward, with G = ∂L/∂y (N, out) and G_k = G[:, cols_k]:
              ∂L/∂u_k = s · G_k B_k              (N, r)
              ∂L/∂B_k = s · G_kᵀ u_k             (os, r)
              ∂L/∂A   = (∂L/∂u)ᵀ D(x)            (g·r, in)
              ∂L/∂x   = D(∂L/∂u A) + G W         (N, in)   the base GEMM again adding into the LoRA term
              ∂L/∂W   = Gᵀ x,  ∂L/∂b = Σ_N G     (only if the base is trainable)
    Folded (no dropout, `folding_pays`): with W' = W + Σ_k s·B_k A_k formed on the fly and freed,
    y = x W'ᵀ + b and ∂L/∂x = G W', each one GEMM of the base's own size; u is then only needed
    for ∂L/∂B. Two rank-r products of N rows fewer each step.
    D(x) is never stored: with dropout, x ⊙ M is formed a block of rows at a time in one reused
    buffer, right before the matmul that reads it, and 1/(1 - p) is applied to the r-dim product
    (equal to the reference up to float rounding).
    Saved: x itself (q, k and v receive the same tensor, so it is stored once), the mask as bits
    (`pack_rows`), and u (N × g·r). The plain formulation also keeps D(x) — a full fp32 copy of x
    per layer — and creates two out-sized temporaries (B(·)·s and the sum) in forward and one
    in-sized sum in backward. Here no pass over an out- or in-sized tensor does only a rank-r add.
    A quantized base passes its packed weight with `dense`, which makes W from it: W is made in
    forward and again in backward, as the quantized layer's own matmul does, and never saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, fan_in_fan_out: bool, slices: tuple[tuple[int, int], ...],
                dropout: float, fold: bool, dense: Callable[[Tensor], Tensor] | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        r = lora_A.shape[0] // len(slices)
        packed, weight = weight, (dense(weight) if dense is not None else weight)
        if fold:
            w = folded_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out, slices,
                               in_place=dense is not None).t()  # (in, out)
            out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w  # (N, out)
            mask = None
            u = x2 @ lora_A.t() if ctx.needs_input_grad[4] else None  # only for ∂L/∂B; x is in cache now
        else:
            u, mask = _dropout_product(x2, lora_A, dropout) if dropout > 0 else (x2 @ lora_A.t(), None)  # (N, g·r)
            out = _low_rank_output(u, lora_B, bias, scaling, slices, weight.shape[1 if fan_in_fan_out else 0])
            out.addmm_(x2, weight if fan_in_fan_out else weight.t())  # the base GEMM adds x Wᵀ into it
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if (need_A or need_W) else None, packed if need_x else None,
                              lora_A if need_x else None, lora_B if (need_x or need_A) else None,
                              u if need_B else None, mask)
        ctx.scaling, ctx.fan_in_fan_out, ctx.slices, ctx.dropout = scaling, fan_in_fan_out, slices, dropout
        ctx.fold, ctx.x_shape, ctx.r, ctx.dense = fold, x.shape, r, dense
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        x, weight, lora_A, lora_B, u, mask = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        if need_x and ctx.dense is not None:
            weight = ctx.dense(weight)
        s, p, r, slices = ctx.scaling, ctx.dropout, ctx.r, ctx.slices
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2: Any = x.reshape(-1, x.shape[-1]) if x is not None else None
        grad_x: Any = None
        grad_W = grad_b = grad_A = grad_B = None
        if need_B:
            grad_B = _per_group([g[:, start:start + size].t() @ u[:, k * r:(k + 1) * r]
                                 for k, (start, size) in enumerate(slices)], dim=0).mul_(s)  # (g·os, r)
        if (need_x and not ctx.fold) or need_A:  # ∂L/∂u · 1/(1 - p): D's scale, then only M is left to apply
            g_u = _per_group([g[:, start:start + size] @ lora_B[k * size:(k + 1) * size]
                              for k, (start, size) in enumerate(slices)], dim=1).mul_(s / (1 - p))  # (N, g·r)
        if need_x and not ctx.fold:
            grad_x = g_u @ lora_A  # (N, in): D(∂L/∂u A) once M is applied; the base GEMM adds G W below
        if mask is not None:
            grad_A = _apply_mask_in_blocks(mask, g_u, x2 if need_A else None, grad_x)
        elif need_A:
            # (g·r, in) formed as (x2ᵀ ∂L/∂u)ᵀ: the same product, which BLAS runs faster that way
            # round on these skinny shapes
            grad_A = (x2.t() @ g_u).t()
        if need_x:
            if ctx.fold:
                grad_x = g @ folded_weight(weight, lora_A, lora_B, s, ctx.fan_in_fan_out, slices,
                                            in_place=ctx.dense is not None)  # (N, in)
            else:
                grad_x.addmm_(g, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x = grad_x.view(ctx.x_shape)
        if need_W:
            grad_W = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_W, grad_b, grad_A, grad_B, None, None, None, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, fan_in_fan_out: bool = False,
                slices: tuple[tuple[int, int], ...] | None = None, dropout: float = 0.0,
                fold: bool | None = None, dense: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """base(x) + B(A(dropout(x)))·s for a linear base, through `LoraLinearFunction`.

    x (..., in) -> (..., out). `slices` gives (first column, width) of each adapter group's output;
    None means one group over every column. `dropout` is the probability to use now (0 in eval).
    `fold`: compute through W + ΔW (see the Function); None decides by `folding_pays`. Never with
    dropout, which the low-rank term sees and the base does not, nor in 16-bit floats, where
    W + ΔW would round away the parts of a young update smaller than half a unit of W.
    `dense`: for a packed (quantized) `weight`, the function making its float (out, in) matrix,
    in x's dtype; `weight` is then only handed to it.
    """
    if dense is not None:  # a packed weight has no float shape: one group over every column, read off A and B
        out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    else:
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    if slices is None:
        slices = ((0, out_features),)
    if fold is None:
        fold = folding_pays(x.numel() // max(in_features, 1), in_features, out_features, dense is not None)
    fold = fold and dropout == 0 and (x.dtype if dense is not None else weight.dtype) in (torch.float32, torch.float64)
    if fold and not torch.is_grad_enabled():  # inference: one GEMM through W + ΔW, nothing to save
        dense_weight = dense(weight) if dense is not None else weight
        folded = folded_weight(dense_weight, lora_A, lora_B, scaling, fan_in_fan_out, slices, dense is not None)
        return F.linear(x, folded, bias)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, slices, dropout, fold,
                                    dense)
