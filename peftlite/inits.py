"""PEFT's data-driven inits of A and B: PiSSA, OLoRA, orthogonal, as plain functions.

PiSSA and OLoRA start the adapter on the principal part of the pretrained
weight and leave the rest in the base: they return (A, B, residual W) with
W_residual + s·B·A = W, so the wrapped model's output starts where the base's
was. The weight is taken as (out, in) float32 (callers transpose Conv1D's
in × out weight first). Orthogonal init leaves W alone. The formulas, the
random draws and their order are PEFT 0.21's, so the same seed gives the same
A and B as PEFT.
"""

from __future__ import annotations

import torch
from torch import Tensor

PISSA_NITER = "pissa_niter_"  # "pissa_niter_K": PiSSA by randomized SVD with K subspace iterations


def mutates_base(init: bool | str | None) -> bool:
    """Whether `init` (a value LoraConfig accepted) moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return init in ("pissa", "olora") or isinstance(init, str) and init.startswith(PISSA_NITER)


def pissa(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: W = U S Vᵀ; B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, residual W − s·B·A.

    weight (out, in) float32; niter: randomized SVD (torch.svd_lowrank) with that many
    subspace iterations instead of the full SVD. Returns A (r, in), B (out, r), residual (out, in).
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        Ur, Sr, V = torch.svd_lowrank(weight, r, niter=niter)
        Sr, Vhr = Sr / scaling, V.t()
    root = torch.diag(torch.sqrt(Sr))
    lora_A, lora_B = root @ Vhr, Ur @ root
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


def olora(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA: W = Q R; B = Q_r, A = R_r, residual W − s·B·A. weight (out, in) float32."""
    Q, R = torch.linalg.qr(weight)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return lora_A, lora_B, weight - scaling * lora_B @ lora_A


def orthogonal(r: int, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """PEFT's orthogonal init: the odd and even rows of one random orthogonal r × r matrix start A and B.

    A (r, in) and B (out, r) are both nonzero, yet B·A = 0 (B·A = Y·Q_even·Q_oddᵀ·Xᵀ and
    Q_even·Q_oddᵀ = 0), so the model starts at the base while both get gradients. r must be even.
    """
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_A = torch.randn(in_features, r // 2).mm(Q[0::2, :]).T / 10.0
    lora_B = torch.randn(r // 2, out_features).T.mm(Q[1::2, :]) / 10.0
    return lora_A.contiguous(), lora_B.contiguous()


def data_init(init: str, weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, residual) for a base-mutating init ("pissa", "pissa_niter_K", "olora") of weight (out, in)."""
    if init == "olora":
        return olora(weight, r, scaling)
    niter = int(init.removeprefix(PISSA_NITER)) if init.startswith(PISSA_NITER) else None
    return pissa(weight, r, scaling, niter=niter)
