"""The LoRA math as plain functions: no modules, no adapter names, no model.

For a frozen weight W (out × in) an adapter adds ΔW = B @ A · s with
A (r × in), B (out × r). The layer classes (peftlite.layers) are thin shells
around these functions, so each can be tested against a written-out formula;
this is the reference the fused training path (peftlite.fast) is held to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
