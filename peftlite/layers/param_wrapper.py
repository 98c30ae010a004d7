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
runs the module, and so does the reference path here: W + ΔW substituted for
the one call (torch.func.functional_call). With the fast switch on, the
outermost wrapper of a chain runs a transformers experts module
(`@use_experts_implementation`) itself, with LoRA on the routed tokens only
(`fast.routed_experts_forward`).
Dropout cannot be factored out of W + ΔW, so PEFT refuses it; so do we.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..fast import experts_applies, experts_gate, routed_experts_forward
from .base import AdapterState, LoraLayer
from .mixed import active_routing


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

    def scaled_per_expert(self, name: str) -> tuple[Tensor, Tensor]:
        """(A (E, r, in), B·s (E, out, r)): the factors `ExpertsLinear` takes, the scaling in B."""
        lora_A, lora_B = self.per_expert(name)
        return lora_A, lora_B * self.adapters[name].scaling

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
        if self.state.fast and experts_applies(module, running, args, kwargs):
            factors = {param: [w.scaled_per_expert(n) for n in names] for param, (w, names) in running.items()}
            return routed_experts_forward(module, x, args[0], args[1], factors, experts_gate(module))
        weights: dict[str, Tensor] = {}
        for param, (w, names) in running.items():
            value: Tensor = w.get_param()
            for name in names:
                value = value + w.delta_weight(name).to(value.dtype)
            weights[param] = value
        return functional_call(module, weights, (x, *args), kwargs)
