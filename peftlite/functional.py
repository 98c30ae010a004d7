"""The LoRA math as plain functions: no modules, no adapter names, no model.

For a frozen weight W (out × in) an adapter adds ΔW = B @ A · s with
A (r × in), B (out × r). Every layer class in `layers.py` is a thin shell
around these functions, so each can be tested against a written-out formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import (as_bytes, draw_dropout_mask, keep_mask_blocks, mask_from_device_generator, mask_rows,
                    numpy_serves, pack_rows)


def init_lora_pair(lora_A: Tensor, lora_B: Tensor, mode: bool | str) -> None:
    """Initialise A and B in place.

    True: A Kaiming-uniform (a=√5, as nn.Linear), B zeros, so ΔW = 0.
    "gaussian": A ~ N(0, 1/r), B zeros. False: both random (for tests: ΔW ≠ 0).
    """
    with torch.no_grad():
        if mode == "gaussian":
            torch.nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
        else:
            torch.nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if mode is False:
            torch.nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            torch.nn.init.zeros_(lora_B)


def init_embedding_pair(lora_A: Tensor, lora_B: Tensor, mode: bool | str) -> None:
    """PEFT's embedding init: A zeros, B normal (both normal when mode is False)."""
    with torch.no_grad():
        torch.nn.init.normal_(lora_B)
        if mode is False:
            torch.nn.init.normal_(lora_A)
        else:
            torch.nn.init.zeros_(lora_A)


def linear_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """B(A(x))·s: (..., in) -> (..., out). Dropout, if any, is applied to x by the caller."""
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def linear_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool) -> Tensor:
    """ΔW = B @ A · s, shaped (out, in), or (in, out) for fan_in_fan_out weights."""
    delta = (lora_B @ lora_A) * scaling
    return delta.T if fan_in_fan_out else delta


def grouped_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, groups: int, scaling: float) -> Tensor:
    """The enabled slices of a fused projection in one grouped op (loralib's MergedLinear).

    x (..., in), lora_A (groups·r, in), lora_B (groups·out_slice, r): slice g uses
    rows g·r:(g+1)·r of A and rows g·out_slice:(g+1)·out_slice of B.
    Returns (..., groups·out_slice), the enabled slices side by side.
    """
    r = lora_A.shape[0] // groups
    after_A = F.linear(x, lora_A).unflatten(-1, (groups, r))  # (..., g, r)
    per_group_B = lora_B.view(groups, -1, r)  # (g, out_slice, r)
    return torch.einsum("...gr,gor->...go", after_A, per_group_B).flatten(-2) * scaling


def grouped_delta_weight(lora_A: Tensor, lora_B: Tensor, groups: int, scaling: float) -> Tensor:
    """ΔW of the enabled slices, (groups·out_slice, in): B_g @ A_g stacked over g."""
    r = lora_A.shape[0] // groups
    per_group = torch.bmm(lora_B.view(groups, -1, r), lora_A.view(groups, r, -1))  # (g, out_slice, in)
    return per_group.flatten(0, 1) * scaling


def embedding_delta(ids: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                    padding_idx: int | None = None) -> Tensor:
    """Look up columns of A (r × num_embeddings), project with B (dim × r): (...,) -> (..., dim)."""
    after_A = F.embedding(ids, lora_A.T, padding_idx=padding_idx)  # (..., r)
    return (after_A @ lora_B.T) * scaling


def embedding_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW for an embedding table, (num_embeddings, dim)."""
    return (lora_B @ lora_A).T * scaling


def conv2d_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, base: torch.nn.Conv2d) -> Tensor:
    """A is a conv with the base kernel, stride, padding and dilation (r, in, kh, kw); B a 1×1 conv (out, r, 1, 1)."""
    after_A = F.conv2d(x, lora_A, stride=base.stride, padding=base.padding, dilation=base.dilation)
    return F.conv2d(after_A, lora_B) * scaling


def conv2d_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW (out, in, kh, kw): B (out, r) applied across A's output channels."""
    return torch.einsum("or,rikl->oikl", lora_B.flatten(1), lora_A) * scaling


# ---- Training paths: custom autograd Functions ---------------------------------------------------
# The plain functions above are the reference. The Functions below compute the same numbers with
# less memory and fewer passes over out-sized tensors; tests hold them to the reference. Dropout masks come from `masks.py`.

MASKED_BLOCK_BYTES = 1 << 20


def _row_blocks(x2: Tensor) -> list[slice]:
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
    and glibc's malloc often hands such sizes out as new pages: a page fault every 4 KiB (7.6K
    faults in one forward pass of a Llama block's seven layers at 2048 rows, none with blocks).
    """
    rows_like = x2 if x2 is not None else grad_x
    blocks, width = _row_blocks(rows_like), rows_like.shape[1]
    grad_A = buffer = None
    if x2 is not None:
        grad_A = x2.new_zeros(width, g_u.shape[1])  # (in, g·r), transposed as in the Function's backward
        buffer = x2.new_empty(blocks[0].stop, width)  # the first block is the largest
    for rows in blocks:
        keep = mask_rows(mask, rows, width)
        if x2 is not None:
            grad_A.addmm_(torch.mul(x2[rows], keep, out=buffer[:rows.stop - rows.start]).t(), g_u[rows])
        if grad_x is not None:
            grad_x[rows].mul_(keep)
    return grad_A.t() if grad_A is not None else None


def _dropout_product(x2: Tensor, lora_A: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """u = D(x2) Aᵀ = ((x2 ⊙ M) Aᵀ) / (1 - p), (N, g·r), and the mask M to keep for backward.

    The scale is applied at rank r. On CPU each block of rows draws its part of the mask
    (`keep_mask_blocks`), uses it at once and keeps it as bits: the mask never exists whole as
    bools, nor do the draws behind it. Elsewhere the device generator draws the whole bool mask,
    and that is kept.
    """
    blocks = _row_blocks(x2)
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


def folding_pays(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a training step is cheaper with ΔW folded into W than with the low-rank products.

    Folded, forming W + ΔW in forward and again in backward costs two passes over an out × in
    weight; unfolded, the rank-r term is written into the output and into ∂L/∂x before the base
    GEMMs add into them, which costs those GEMMs a read of rows × (in + out) more. Measured per
    layer (benchmarks/train_step.py's widths, 512 and 1376): unfolded is 10% faster at 512 rows,
    even at 2048, 1-2% slower at 4096 and 2-7% slower at 8192; in the model, folding also raised
    peak memory by 2-3% at 4096 rows (each transient W + ΔW leaves a hole in the heap between
    saved activations). So fold once rows pass 8× the harmonic mean of in and out.
    """
    return rows * (in_features + out_features) > 16 * in_features * out_features


def _per_group(parts: list[Tensor], dim: int) -> Tensor:
    """The groups' results side by side (no copy for the usual single group)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _low_rank_output(u: Tensor, lora_B: Tensor, bias: Tensor | None, scaling: float,
                     slices: tuple[tuple[int, int], ...], out_features: int) -> Tensor:
    """b + s · u_k B_kᵀ in each group's columns: (N, out), a new tensor.

    The forward pass writes this first and lets the base GEMM add x Wᵀ into it (beta = 1), where
    the GEMM reads it tile by tile while computing; adding the rank-r term after the GEMM instead
    is one more pass over the output, about 1 ms a layer at 2048 × 1376 (measured).
    """
    r = u.shape[1] // len(slices)
    if slices == ((0, out_features),):
        return torch.addmm(bias, u, lora_B.t(), alpha=scaling) if bias is not None else u @ (lora_B.t() * scaling)
    out = bias.expand(u.shape[0], out_features).clone() if bias is not None else u.new_zeros(u.shape[0], out_features)
    for k, (start, size) in enumerate(slices):
        out[:, start:start + size].addmm_(u[:, k * r:(k + 1) * r], lora_B[k * size:(k + 1) * size].t(), alpha=scaling)
    return out


def _folded_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool,
                   slices: tuple[tuple[int, int], ...]) -> Tensor:
    """W + s · B_k A_k in each group's rows: (out, in), a new tensor; `weight` is untouched."""
    w = weight.t() if fan_in_fan_out else weight  # (out, in)
    if slices == ((0, w.shape[0]),):
        return torch.addmm(w, lora_B, lora_A, alpha=scaling)
    folded, r = w.clone(), lora_A.shape[0] // len(slices)
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
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, fan_in_fan_out: bool, slices: tuple[tuple[int, int], ...],
                dropout: float, fold: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        r = lora_A.shape[0] // len(slices)
        if fold:
            w = _folded_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out, slices).t()  # (in, out)
            out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w  # (N, out)
            mask = None
            u = x2 @ lora_A.t() if ctx.needs_input_grad[4] else None  # only for ∂L/∂B; x is in cache now
        else:
            u, mask = _dropout_product(x2, lora_A, dropout) if dropout > 0 else (x2 @ lora_A.t(), None)  # (N, g·r)
            out = _low_rank_output(u, lora_B, bias, scaling, slices, weight.shape[1 if fan_in_fan_out else 0])
            out.addmm_(x2, weight if fan_in_fan_out else weight.t())  # the base GEMM adds x Wᵀ into it
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x if (need_A or need_W) else None, weight if need_x else None,
                              lora_A if need_x else None, lora_B if (need_x or need_A) else None,
                              u if need_B else None, mask)
        ctx.scaling, ctx.fan_in_fan_out, ctx.slices, ctx.dropout = scaling, fan_in_fan_out, slices, dropout
        ctx.fold, ctx.x_shape, ctx.r = fold, x.shape, r
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_A, lora_B, u, mask = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        s, p, r, slices = ctx.scaling, ctx.dropout, ctx.r, ctx.slices
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        grad_x = grad_W = grad_b = grad_A = grad_B = None
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
            # (g·r, in) formed as (x2ᵀ ∂L/∂u)ᵀ: the same product, which MKL computes 20-40% faster
            # that way round on these skinny shapes (2048 rows, in 512 and 1376, measured)
            grad_A = (x2.t() @ g_u).t()
        if need_x:
            if ctx.fold:
                grad_x = g @ _folded_weight(weight, lora_A, lora_B, s, ctx.fan_in_fan_out, slices)  # (N, in)
            else:
                grad_x.addmm_(g, weight.t() if ctx.fan_in_fan_out else weight)
            grad_x = grad_x.view(ctx.x_shape)
        if need_W:
            grad_W = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_W, grad_b, grad_A, grad_B, None, None, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, fan_in_fan_out: bool = False,
                slices: tuple[tuple[int, int], ...] | None = None, dropout: float = 0.0,
                fold: bool | None = None) -> Tensor:
    """base(x) + B(A(dropout(x)))·s for a linear base, through `LoraLinearFunction`.

    x (..., in) -> (..., out). `slices` gives (first column, width) of each adapter group's output;
    None means one group over every column. `dropout` is the probability to use now (0 in eval).
    `fold`: compute through W + ΔW (see the Function); None decides by `folding_pays`. Never with
    dropout, which the low-rank term sees and the base does not, nor in 16-bit floats, where
    W + ΔW would round away the parts of a young update smaller than half a unit of W.
    """
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    if slices is None:
        slices = ((0, out_features),)
    if fold is None:
        fold = folding_pays(x.numel() // max(in_features, 1), in_features, out_features)
    fold = fold and dropout == 0 and weight.dtype in (torch.float32, torch.float64)
    if fold and not torch.is_grad_enabled():  # inference: one GEMM through W + ΔW, nothing to save
        return F.linear(x, _folded_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out, slices), bias)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, slices, dropout, fold)


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
        grad_x = grad_W = grad_b = None
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
