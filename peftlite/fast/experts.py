"""MoE experts with LoRA on their 3-D parameters, computed for the routed tokens only.

PEFT adds every expert's ΔW to the parameter on every call, then runs the
experts module. Here a transformers experts module (`@use_experts_implementation`)
is run by `routed_experts_forward` instead: tokens are sorted by expert, and
expert e's rows x get x W_eᵀ + (x A_eᵀ)(B_e s)ᵀ, so only routed tokens pay for
low-rank terms, no ΔW is ever formed, and no gradient of the frozen W is
computed. Each projection is one `ExpertsLinear` node.

Memory: a LoRA must keep a projection's input x for ∂L/∂A, and the routed
rows (S, d) and the gated activations (S, inter) are the largest tensors of
the layer. So each node saves what its input is made from, not the input, and
makes x again in backward through an `ExpertsInput`: the routed rows from
hidden (T, d) by `RoutedRows`, the gated activations from the up projection's
output by `SwiGLU` (transformers' default gate, its backward written out) or,
for any other gate, by `AutogradInput` (autograd through the module's own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

InputBackward = Callable[[Tensor], Tensor]  # ∂L/∂x -> ∂L/∂source
Factors = list[tuple[Tensor, Tensor]]  # per running adapter: A (E, r, in), B·s (E, out, r)


class ExpertsInput(Protocol):
    """How a projection's input x (S, in) is made from the tensor its node saves."""

    def __call__(self, source: Tensor, /) -> Tensor:
        """x, in forward (no graph)."""
        ...

    def recompute(self, source: Tensor, /) -> tuple[Tensor, InputBackward]:
        """x again, in backward, and the map from ∂L/∂x to ∂L/∂source (it may overwrite ∂L/∂x and x)."""
        ...


@dataclass(frozen=True)
class RoutedRows:
    """x = hidden[token]: hidden (T, d) gathered into the S rows sorted by expert."""

    token: Tensor  # (S,), the token of each sorted row

    def __call__(self, hidden: Tensor) -> Tensor:
        return hidden[self.token]

    def recompute(self, hidden: Tensor) -> tuple[Tensor, InputBackward]:
        return hidden[self.token], lambda grad_x: torch.zeros_like(hidden).index_add_(0, self.token, grad_x)


class SwiGLU:
    """x = silu(a)·b for h = [a | b] (S, 2·inter): transformers' default gate with SiLU.

    In backward, silu(a) and x are formed in the two halves of the buffer that
    becomes ∂L/∂h and are overwritten by it, so the gate allocates one (S, 2·inter)
    tensor; autograd through it allocates four (S, inter) and a concatenation.
    """

    def __call__(self, h: Tensor) -> Tensor:
        a, b = h.chunk(2, dim=-1)
        return F.silu(a).mul_(b)

    def recompute(self, h: Tensor) -> tuple[Tensor, InputBackward]:
        a, b = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.ops.aten.silu.out(a, out=grad_b)  # silu(a)
        x = torch.mul(grad_b, b, out=grad_a)

        def backward(grad_x: Tensor) -> Tensor:
            grad_b.mul_(grad_x)  # ∂L/∂b = ∂L/∂x · silu(a)
            torch.ops.aten.silu_backward.grad_input(grad_x.mul_(b), a, grad_input=grad_a)  # ∂L/∂a, over x
            return grad_h

        return x, backward


@dataclass(frozen=True)
class AutogradInput:
    """x = fn(source) for any gate or activation `fn`, taken back by autograd."""

    fn: Callable[[Tensor], Tensor]

    def __call__(self, source: Tensor) -> Tensor:
        return self.fn(source)

    def recompute(self, source: Tensor) -> tuple[Tensor, InputBackward]:
        with torch.enable_grad():
            leaf = source.detach().requires_grad_(True)
            x = self.fn(leaf)
        return x.detach(), lambda grad_x: torch.autograd.grad(x, leaf, grad_x)[0]


def routed_experts_forward(experts: Any, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                           factors: dict[str, Factors], gate: ExpertsInput) -> Tensor:
    """transformers' experts forward with LoRA on the routed tokens only (`experts`: a module of theirs).

    hidden (T, d), top_k_index and top_k_weights (T, k); `factors` by parameter
    name; `gate` makes the down projection's input from the up projection's
    output. The S = T·k (token, expert) pairs are sorted by expert; each
    expert's rows go through its up (or gate_up) projection, the gate, its down
    projection, then are weighted and put back in (token, k) order to be summed
    per token: the algorithm of transformers' grouped_mm implementation.
    """
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,)
    order = torch.argsort(expert_ids, stable=True)  # row i of the sorted rows is pair order[i]
    counts = torch.bincount(expert_ids, minlength=experts.num_experts).tolist()
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _experts_linear(experts, up, hidden, RoutedRows(order // top_k), counts, factors.get(up, []))
    out = _experts_linear(experts, "down_proj", h, gate, counts, factors.get("down_proj", []))  # (S, d)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order, None]
    # indexing saves only the index for backward; index_copy would also keep `out` (S, d)
    unsorted = out[torch.argsort(order)]  # (S, d) in (token, k) order
    return unsorted.view(-1, top_k, out.shape[-1]).sum(dim=1).to(hidden.dtype)


def _experts_linear(experts: Any, name: str, source: Tensor, make_x: ExpertsInput, counts: list[int],
                    factors: Factors) -> Tensor:
    """`ExpertsLinear` on parameter `name` (and its bias) of `experts`, with the running adapters' factors."""
    bias = getattr(experts, name + "_bias") if experts.has_bias else None
    return ExpertsLinear.apply(source, make_x, getattr(experts, name), bias, counts, experts.is_transposed,
                               *[t for pair in factors for t in pair])


class ExpertsLinear(torch.autograd.Function):
    """Rows sorted by expert through their expert's weight and LoRA pairs: x (S, in) -> y (S, out).

    For expert e's rows x_e: y_e = x_e W_eᵀ (+ b_e) + Σ_a (x_e A_aeᵀ) B_aeᵀ,
    W (E, out, in), or (E, in, out) when `transposed`; A_a (E, r, in), B_a (E, out, r)
    with the scaling already in it. x = make_x(source) is formed here and again in
    backward; saved are `source`, the rank-r products u_a (S, r) and the factors.
    Outputs and gradients are written a slice per expert into one tensor each (no
    per-expert parts, no concatenation), the rank-r term first and the base
    product added into it. W and b get gradients only if they require them.
    """

    @staticmethod
    def forward(ctx: Any, source: Tensor, make_x: ExpertsInput, weight: Tensor, bias: Tensor | None,
                counts: list[int], transposed: bool, *factors: Tensor) -> Tensor:
        x = make_x(source)
        y = x.new_empty(x.shape[0], weight.shape[-1] if transposed else weight.shape[-2])
        pairs = list(zip(factors[::2], factors[1::2]))
        us = [x.new_empty(x.shape[0], lora_A.shape[1], dtype=lora_A.dtype) for lora_A, _ in pairs]
        # per expert: its rows of x, y and each u; W_eᵀ, A_e and B_eᵀ (views, made once)
        x_rows, y_rows, u_rows = x.split(counts), y.split(counts), [u.split(counts) for u in us]
        weights_t = weight.unbind(0) if transposed else weight.transpose(-2, -1).unbind(0)
        factors_e = [(lora_A.unbind(0), lora_B.to(y.dtype).transpose(-2, -1).unbind(0)) for lora_A, lora_B in pairs]
        for e, n in enumerate(counts):
            if not n:
                continue
            x_e, y_e = x_rows[e], y_rows[e]
            written = bias is not None  # whether y_e holds a term yet
            if bias is not None:
                y_e.copy_(bias[e].expand_as(y_e))
            for (A, B_t), u in zip(factors_e, u_rows):
                torch.mm(x_e.to(A[e].dtype), A[e].t(), out=u[e])
                _add_product(y_e, u[e].to(y.dtype), B_t[e], written)
                written = True
            _add_product(y_e, x_e, weights_t[e], written)
        ctx.make_x, ctx.counts, ctx.transposed = make_x, counts, transposed
        ctx.save_for_backward(source, weight, bias, *us, *factors)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: raise rather than return a wrong one
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        source, weight, bias, *rest = ctx.saved_tensors
        us, factors = rest[:len(rest) // 3], rest[len(rest) // 3:]
        needs, counts = ctx.needs_input_grad, ctx.counts
        x, input_backward = ctx.make_x.recompute(source)
        grad_x = x.new_empty(x.shape) if needs[0] else None  # contiguous, as x may not be
        grad_weight = torch.zeros_like(weight) if needs[2] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[3] else None
        grad_factors = [torch.zeros_like(t) if need else None for t, need in zip(factors, needs[6:])]
        g_rows, x_rows = grad_y.split(counts), x.split(counts)
        gx_rows = grad_x.split(counts) if grad_x is not None else None
        # per adapter: A_e, B_e (in g's dtype), u's rows, and grad_A[e], grad_B[e] (None: not needed)
        adapters = [(lora_A.unbind(0), lora_B.to(grad_y.dtype).unbind(0), u.split(counts),
                     None if grad_A is None else grad_A.unbind(0), None if grad_B is None else grad_B.unbind(0))
                    for u, lora_A, lora_B, grad_A, grad_B
                    in zip(us, factors[::2], factors[1::2], grad_factors[::2], grad_factors[1::2])]
        weights = weight.unbind(0)
        for e, n in enumerate(counts):
            if not n:
                continue
            g, x_e = g_rows[e], x_rows[e]  # (n, out), (n, in)
            written = False  # whether grad_x's rows hold a term yet
            if grad_weight is not None:
                _product_into(grad_weight[e], *((x_e.t(), g) if ctx.transposed else (g.t(), x_e)))
            if grad_bias is not None:
                torch.sum(g, dim=0, out=grad_bias[e])
            for A, B, u, grad_A, grad_B in adapters:
                grad_u = torch.mm(g, B[e]).to(A[e].dtype)  # (n, r)
                if grad_A is not None:
                    torch.mm(grad_u.t(), x_e.to(grad_u.dtype), out=grad_A[e])
                if grad_B is not None:
                    _product_into(grad_B[e], g.t(), u[e].to(g.dtype))
                if gx_rows is not None:
                    _add_product(gx_rows[e], grad_u.to(x.dtype), A[e].to(x.dtype), written)
                    written = True
            if gx_rows is not None:
                _add_product(gx_rows[e], g, weights[e].t() if ctx.transposed else weights[e], written)
        grad_source = input_backward(grad_x) if grad_x is not None else None
        return grad_source, None, grad_weight, grad_bias, None, None, *grad_factors


def _product_into(out: Tensor, left: Tensor, right: Tensor) -> None:
    """out = left @ right, computed in left's dtype (an adapter's factor may be wider than the base)."""
    if left.dtype == out.dtype:
        torch.mm(left, right, out=out)
    else:
        out.copy_(left @ right)


def _add_product(out: Tensor, left: Tensor, right: Tensor, accumulate: bool) -> None:
    """out (+)= left @ right, in place. The rank-r terms are written first and the base GEMM adds into them
    (beta = 1), reading out tile by tile as it computes: adding a term after it would be one more pass."""
    if accumulate:
        out.addmm_(left, right)
    else:
        torch.mm(left, right, out=out)
