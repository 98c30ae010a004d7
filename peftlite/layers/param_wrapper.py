"""LoRA on a parameter rather than a module: PEFT's `target_parameters`, made for MoE experts.

transformers 5 keeps an MoE layer's experts as 3-D parameters of one module:
Mixtral's `experts.gate_up_proj` is (E, 2·inter, d) and `experts.down_proj`
(E, d, inter), i.e. (E, out, in) per expert; GPT-OSS stores them transposed,
(E, in, out) (`experts.is_transposed`). As PEFT 0.21's ParamWrapper, one
wrapper adds per expert e a rank-r pair to one such parameter:

    lora_A[name]: nn.Linear(in, E·r), weight (E·r, in): rows e·r … e·r+r−1 are A_e (r, in)
    lora_B[name]: nn.Linear(E·r, out), weight (out, E·r): columns e, E+e, 2E+e, … are B_e (out, r)
    ΔW_e = B_e @ A_e · s, (out, in), transposed for an (E, in, out) parameter.

A 2-D parameter (out, in) is one expert. Several parameters of one module
nest as in PEFT, one wrapper each, the one registered last outermost, so the
in-memory names and file keys are PEFT's (`experts.base_layer.lora_A.weight`
is gate_up_proj's when down_proj is targeted too).

Forward. PEFT adds every expert's ΔW to the parameter on every call, then
runs the module. Here the outermost wrapper of a chain runs a transformers
experts module (`@use_experts_implementation`) itself: tokens are sorted by
expert, and expert e's rows x get x W_eᵀ + s·(x A_eᵀ) B_eᵀ, so only routed
tokens pay for low-rank terms, no ΔW is ever formed, and no gradient of the
frozen W is computed. For memory, each projection saves what its input is made
from, not the input (`ExpertsLinear`): a LoRA must keep x for ∂L/∂A, and the
gathered rows and the gated activations are the largest tensors of the layer.
Any other module (or with the fast switch off) runs with
W + ΔW substituted for the one call (torch.func.functional_call): PEFT's math.
Dropout cannot be factored out of W + ΔW, so PEFT refuses it; so do we.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import AdapterState, LoraLayer
from .mixed import active_routing

# The parameters a transformers experts module's own forward reads, by role.
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


class ParamWrapper(LoraLayer):
    """LoRA on `getattr(module, parameter_name)` of the innermost wrapped module (2-D or 3-D)."""

    def __init__(self, base_layer: nn.Module, state: AdapterState, parameter_name: str) -> None:
        super().__init__(base_layer, state)
        self.parameter_name = parameter_name
        param = getattr(self.get_base_layer(), parameter_name, None)
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3):
            raise ValueError(f"parameter {parameter_name!r} of {type(self.get_base_layer()).__name__} cannot take "
                             f"LoRA: expected a 2-D or 3-D nn.Parameter, got {type(param).__name__}"
                             + (f" of shape {tuple(param.shape)}" if isinstance(param, Tensor) else ""))
        self.is_transposed = param.dim() == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        if param.dim() == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, tuple(param.shape)
        elif self.is_transposed:
            self.num_experts, self.in_features, self.out_features = tuple(param.shape)
        else:
            self.num_experts, self.out_features, self.in_features = tuple(param.shape)

    def get_base_layer(self) -> nn.Module:
        """The module that owns the parameter, under any nested wrappers."""
        module = self.base_layer
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        return module

    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def config_key(self, path: str) -> str:
        """`<module path>.<parameter>`, PEFT's key for rank_pattern (a nested wrapper's ".base_layer"s dropped)."""
        while path.endswith(".base_layer"):
            path = path[:-len(".base_layer")]
        return f"{path}.{self.parameter_name}"

    def base_weight_reference(self) -> Tensor:
        return self.get_param()

    def merge_target(self) -> Tensor:
        return self.get_param()

    @property
    def weight(self) -> Tensor:
        return self.get_param()

    @property
    def bias(self) -> None:
        return None

    # ---- factors ---------------------------------------------------------------------------------
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.num_experts * r, self.in_features), (self.out_features, self.num_experts * r)

    def init_factors(self, name: str, init: bool | str) -> None:
        """PEFT's init of its nn.Linear factors; "gaussian" uses std 1/r (r per expert), as PEFT does."""
        lora_A, lora_B = self.factors(name)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(lora_A, std=1 / self.adapters[name].r)
            else:
                nn.init.kaiming_uniform_(lora_A, a=5 ** 0.5)
            if init is False:
                nn.init.kaiming_uniform_(lora_B, a=5 ** 0.5)
            else:
                nn.init.zeros_(lora_B)

    def per_expert(self, name: str) -> tuple[Tensor, Tensor]:
        """(A (E, r, in), B (E, out, r)) of adapter `name` from PEFT's layout.

        A is a view; B is copied (E·out·r values) so each B_e is contiguous: PEFT's
        expert-minor columns would make every per-expert product gather strided memory.
        """
        lora_A, lora_B = self.factors(name)
        experts = self.num_experts
        return (lora_A.view(experts, -1, lora_A.shape[-1]),
                lora_B.view(lora_B.shape[0], -1, experts).permute(2, 0, 1).contiguous())

    def delta_weight(self, name: str) -> Tensor:
        """ΔW shaped like the parameter: (E, out, in), (E, in, out) if transposed, (out, in) for 2-D."""
        lora_A, lora_B = self.per_expert(name)
        delta = torch.bmm(lora_B, lora_A) * self.adapters[name].scaling  # (E, out, in)
        if self.get_param().dim() == 2:
            return delta[0]
        return delta.transpose(1, 2) if self.is_transposed else delta

    def lora_term(self, x: Tensor, name: str) -> Tensor:
        raise ValueError(f"LoRA on parameter {self.parameter_name!r} has no separate output term: it changes "
                         "the parameter the module computes with")

    # ---- forward ---------------------------------------------------------------------------------
    def chain(self) -> list["ParamWrapper"]:
        """This wrapper and the ones nested in it, outermost first."""
        wrappers: list[ParamWrapper] = [self]
        while isinstance(wrappers[-1].base_layer, ParamWrapper):
            wrappers.append(wrappers[-1].base_layer)
        return wrappers

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if active_routing(self.state) is not None:
            raise ValueError(f"LoRA on parameter {self.parameter_name!r} (target_parameters) takes no "
                             "mixed-adapter batches, as in PEFT: call the model without adapter_names")
        running = {w.parameter_name: (w, w.running_adapters()) for w in self.chain()}
        running = {param: (w, names) for param, (w, names) in running.items() if names}
        module = self.get_base_layer()
        if not running:
            return module(x, *args, **kwargs)
        if self.state.fast and routes_itself(module, running, args, kwargs):
            terms = {param: [(*w.per_expert(n), w.adapters[n].scaling) for n in names]
                     for param, (w, names) in running.items()}
            return routed_experts_forward(module, x, args[0], args[1], terms)
        weights: dict[str, Tensor] = {}
        for param, (w, names) in running.items():
            value: Tensor = w.get_param()
            for name in names:
                value = value + w.delta_weight(name).to(value.dtype)
            weights[param] = value
        return functional_call(module, weights, (x, *args), kwargs)


def routes_itself(module: nn.Module, running: dict, args: tuple, kwargs: dict) -> bool:
    """Whether `module` is a transformers experts module called as (hidden, top_k_index, top_k_weights)."""
    return (all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate"))
            and not getattr(module, "_is_expert_parallel", False) and len(args) == 2 and not kwargs
            and all(param in EXPERT_PARAMETERS for param in running))


Terms = list[tuple[Tensor, Tensor, float]]  # per running adapter: A (E, r, in), B (E, out, r), s


def routed_experts_forward(experts: Any, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                           terms: dict[str, Terms]) -> Tensor:
    """transformers' experts forward with LoRA on the routed tokens only (`experts`: a module of theirs).

    hidden (T, d), top_k_index and top_k_weights (T, k). The S = T·k (token,
    expert) pairs are sorted by expert; each expert's rows go through its up (or
    gate_up) projection, the module's gate, its down projection, then are
    weighted and put back in (token, k) order to be summed per token: the
    algorithm of transformers' grouped_mm implementation. Each projection is
    one `ExpertsLinear` node that saves what its input is made from rather than
    the input: hidden (T, d) rather than the gathered rows (S, d), and the
    up projection's output rather than the gated (S, inter) it gives, so the
    gate's own activations are not kept either (it runs again in backward).
    """
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,)
    order = torch.argsort(expert_ids, stable=True)  # row i of the sorted rows is pair order[i]
    counts = torch.bincount(expert_ids, minlength=experts.num_experts).tolist()
    token = order // top_k

    def rows_of(tokens: Tensor) -> Tensor:  # (T, d) -> (S, d), grouped by expert
        return tokens[token]

    up = "gate_up_proj" if experts.has_gate else "up_proj"
    gate = experts._apply_gate if experts.has_gate else experts.act_fn
    h = _experts_linear(experts, up, hidden, rows_of, counts, terms.get(up, []))  # (S, 2·inter) or (S, inter)
    out = _experts_linear(experts, "down_proj", h, gate, counts, terms.get("down_proj", []))  # (S, d)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order, None]
    # indexing saves only the index for backward; index_copy would also keep `out` (S, d)
    unsorted = out[torch.argsort(order)]  # (S, d) in (token, k) order
    return unsorted.view(-1, top_k, out.shape[-1]).sum(dim=1).to(hidden.dtype)


def _experts_linear(experts: Any, name: str, source: Tensor, make_x: Callable[[Tensor], Tensor],
                    counts: list[int], terms: Terms) -> Tensor:
    """`ExpertsLinear` on parameter `name` (and its bias) of `experts`, with the running adapters' factors."""
    bias = getattr(experts, name + "_bias") if experts.has_bias else None
    factors = [t for lora_A, lora_B, _ in terms for t in (lora_A, lora_B)]
    return ExpertsLinear.apply(source, make_x, getattr(experts, name), bias, counts, experts.is_transposed,
                               tuple(s for _, _, s in terms), *factors)


class ExpertsLinear(torch.autograd.Function):
    """Rows sorted by expert through their expert's weight and LoRA pairs: x (S, in) -> y (S, out).

    For expert e's rows x_e: y_e = x_e W_eᵀ (+ b_e) + Σ_a s_a·(x_e A_aeᵀ) B_aeᵀ,
    W (E, out, in), or (E, in, out) when `transposed`; A_a (E, r, in), B_a (E, out, r).
    x = make_x(source) is formed here and again in backward, where autograd takes
    ∂L/∂x back through make_x; saved are `source`, the rank-r products u_a
    (S, r) and the factors. Outputs and ∂L/∂x are written a slice per expert into
    one tensor (no per-expert parts, no concatenation). W and b get gradients
    only if they require them (a frozen base computes none).
    """

    @staticmethod
    def forward(ctx: Any, source: Tensor, make_x: Callable[[Tensor], Tensor], weight: Tensor,
                bias: Tensor | None, counts: list[int], transposed: bool, scalings: tuple[float, ...],
                *factors: Tensor) -> Tensor:
        x = make_x(source)
        y = x.new_empty(x.shape[0], weight.shape[-1] if transposed else weight.shape[-2])
        pairs = list(zip(factors[::2], factors[1::2], scalings))
        us = [x.new_empty(x.shape[0], lora_A.shape[1], dtype=lora_A.dtype) for lora_A, _, _ in pairs]
        for e, rows in _expert_rows(counts):
            x_e, y_e = x[rows], y[rows]
            written = bias is not None  # whether y_e holds a term yet
            if bias is not None:
                y_e.copy_(bias[e].expand_as(y_e))
            for (lora_A, lora_B, scaling), u in zip(pairs, us):
                u_e = torch.mm(x_e.to(lora_A.dtype), lora_A[e].t(), out=u[rows])
                _add_product(y_e, u_e.to(y.dtype), lora_B[e].t().to(y.dtype), scaling, written)
                written = True
            _add_product(y_e, x_e, weight[e] if transposed else weight[e].t(), 1.0, written)
        ctx.make_x, ctx.counts, ctx.transposed, ctx.scalings = make_x, counts, transposed, scalings
        ctx.save_for_backward(source, weight, bias, *us, *factors)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: raise rather than return a wrong one
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        source, weight, bias, *rest = ctx.saved_tensors
        us, factors = rest[:len(ctx.scalings)], rest[len(ctx.scalings):]
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaf = source.detach().requires_grad_(needs[0])
            x_graph = ctx.make_x(leaf)
        x = x_graph.detach()
        grad_x = torch.empty_like(x) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[2] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[3] else None
        grad_factors = [torch.zeros_like(t) if need else None for t, need in zip(factors, needs[7:])]
        for e, rows in _expert_rows(ctx.counts):
            g, x_e = grad_y[rows], x[rows]  # (n, out), (n, in)
            written = False  # whether grad_x[rows] holds a term yet
            if grad_weight is not None:
                grad_weight[e] = x_e.t() @ g if ctx.transposed else g.t() @ x_e
            if grad_bias is not None:
                grad_bias[e] = g.sum(dim=0)
            for a, (u, scaling) in enumerate(zip(us, ctx.scalings)):
                lora_A, lora_B = factors[2 * a], factors[2 * a + 1]
                grad_A, grad_B = grad_factors[2 * a], grad_factors[2 * a + 1]
                grad_u = (g @ lora_B[e].to(g.dtype)).mul_(scaling).to(lora_A.dtype)  # (n, r)
                if grad_A is not None:
                    grad_A[e] = grad_u.t() @ x_e.to(lora_A.dtype)
                if grad_B is not None:
                    grad_B[e] = (g.t() @ u[rows].to(g.dtype)).mul_(scaling).to(lora_B.dtype)
                if grad_x is not None:
                    _add_product(grad_x[rows], grad_u.to(x.dtype), lora_A[e].to(x.dtype), 1.0, written)
                    written = True
            if grad_x is not None:
                _add_product(grad_x[rows], g, weight[e].t() if ctx.transposed else weight[e], 1.0, written)
        grad_source = torch.autograd.grad(x_graph, leaf, grad_x)[0] if grad_x is not None else None
        return grad_source, None, grad_weight, grad_bias, None, None, None, *grad_factors


def _add_product(out: Tensor, left: Tensor, right: Tensor, alpha: float, accumulate: bool) -> None:
    """out (+)= alpha · left @ right, in place; `right` is the small factor, scaled when there is nothing to
    add to. The rank-r terms are written first and the base GEMM adds into them (beta = 1), reading out
    tile by tile as it computes: adding a term after it would be one more pass over out."""
    if accumulate:
        out.addmm_(left, right, alpha=alpha)
    else:
        torch.mm(left, right if alpha == 1.0 else right * alpha, out=out)


def _expert_rows(counts: list[int]) -> list[tuple[int, slice]]:
    """(e, expert e's slice of the sorted rows) for each expert with rows."""
    rows, start = [], 0
    for e, n in enumerate(counts):
        if n:
            rows.append((e, slice(start, start + n)))
        start += n
    return rows
