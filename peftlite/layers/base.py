"""What every LoRA layer shares: the wrapped base layer, PEFT's containers, one record per adapter.

In memory a layer looks as PEFT's does, so code that reads parameters by name
sees the same thing: `base_layer` is the original module (never copied or
re-initialised), `lora_A[name]`/`lora_B[name]` (or `lora_embedding_A/B[name]`
for an embedding) hold the factors, `lora_dropout[name]` is torch's dropout.
What PEFT spreads over parallel dicts (r, alpha, scaling, variant) is one
`LoraAdapter` record per name here; `layer.r`, `layer.scaling`, ... are views
of those records, so `layer.scaling["a"] = 2.0` still works.

Which adapters run is read from the `AdapterState` every layer of one model
shares, so switching is one assignment. Forward is the textbook formula: the
base output, then each running adapter's term through its variant; the fused
training path (peftlite.fast) replaces it only where a layer kind says it
applies and the model's `fast` switch is on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .gate import DISABLED, ModelLock
from .mixed import active_routing, mixed_lora_forward
from .records import LoraAdapter, RecordView

if TYPE_CHECKING:
    pass


FP16_SCALING_LIMIT = 256.0  # √65504: a larger scaling makes float16 LoRA terms overflow for ordinary inputs


@dataclass(eq=False)
class AdapterState:
    """The per-model switchboard, shared by reference by every LoRA layer of one model.

    active: the adapters that run, in order (PEFT allows several; their terms add up).
    disabled: every adapter off (disable_adapter()). merged_count: (layer, adapter)
    merges, so "anything merged?" is O(1). mixed_calls: one token per mixed-adapter
    call running now in any thread (layers skip the routing lookup without one).
    fast: the switch for the fused training path (peftlite.fast); off, every layer
    runs the reference forward. lock: held by calls that change the model, which wait
    for running forwards (layers/gate.py).
    """

    active: tuple[str, ...] = ()
    disabled_everywhere: bool = False  # disable_adapter_layers()
    disable_depth: int = 0  # disable_adapter() blocks open now, in any thread
    merged_count: int = 0
    mixed_calls: list[object] = field(default_factory=list)
    fast: bool = True
    lock: ModelLock = field(default_factory=ModelLock)

    @property
    def disabled(self) -> bool:
        """Adapters off, model-wide as in PEFT: disable_adapter_layers(), or a disable_adapter() block open."""
        return self.disabled_everywhere or self.disable_depth > 0

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self.disabled_everywhere = value

    def disabled_for_mixed_batch(self) -> bool:
        """A mixed batch names its adapters: only disable_adapter_layers() or this thread's own
        disable_adapter() turn them off, not a disable_adapter() block open in another thread."""
        return self.disabled_everywhere or self in DISABLED.get()

    def __getstate__(self) -> dict[str, Any]:
        """A copy (deepcopy, pickle) gets a lock of its own and no running calls."""
        return {**self.__dict__, "lock": None, "mixed_calls": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=ModelLock())


def uninitialised_linear(in_features: int, out_features: int, dtype: torch.dtype,
                         device: torch.device) -> nn.Linear:
    """An nn.Linear(in, out, bias=False) whose weight (out, in) is allocated but not initialised.

    A's and B's values are written right after (an init, or a loader), so nn.Linear's own
    Kaiming init would be wasted, and torch's skip_init costs more than the layer itself.
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
    layer.register_parameter("bias", None)
    return layer


def _parameters_of(item: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [item] if isinstance(item, nn.Parameter) else list(item.parameters())


class LoraLayer(nn.Module):
    """A base layer plus LoRA adapters. Subclasses give the per-kind shapes and math."""

    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    base_layer: Any  # any module of a kind in layers.LORA_CLASSES; its attributes are that kind's

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()  # registered in PEFT's order, so named_modules() lists as PEFT's
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.adapters: dict[str, LoraAdapter] = {}
        self.merged_adapters: list[str] = []  # merged into base_layer's weight, in merge order
        # (weight, bias) before the first merge, so unmerge restores them bit for bit: subtracting ΔW
        # again cannot undo rounding (bf16), an overflow (|ΔW| ≫ |W|) or a NaN. One copy while merged.
        self.pre_merge: tuple[Tensor, Tensor | None] | None = None
        self.state = state

    # ---- PEFT's per-layer names ------------------------------------------------------------------
    @property
    def r(self) -> RecordView:
        return RecordView(self.adapters, "r")

    @property
    def lora_alpha(self) -> RecordView:
        return RecordView(self.adapters, "lora_alpha")

    @property
    def scaling(self) -> RecordView:
        return RecordView(self.adapters, "scaling")

    @property
    def use_dora(self) -> dict[str, bool]:
        return {name: record.variant.name == "dora" for name, record in self.adapters.items()}

    @property
    def lora_bias(self) -> dict[str, bool]:
        return {name: record.lora_bias for name, record in self.adapters.items()}

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        return [name for name in self.state.active if name in self.adapters]

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def disable_adapters(self) -> bool:
        return self.state.disabled

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def set_scale(self, adapter: str, scale: float) -> None:
        """scaling = scale · alpha / r, as PEFT's set_scale."""
        if adapter in self.adapters:
            record = self.adapters[adapter]
            record.scaling = scale * record.lora_alpha / record.r

    # ---- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, record: LoraAdapter, dropout: float, init: bool | str | None,
                    dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Create adapter `name`'s factors (on the base weight's device; dtype: float32 over a 16-bit base).

        init=None leaves them uninitialised, for a loader that fills them right away.
        """
        self.factor_shapes(record.r)  # raises for a base this layer kind cannot adapt, before any change
        if record.lora_bias and not self.takes_lora_bias():
            raise ValueError(f"lora_bias=True is not supported on {type(self).__name__} over "
                             f"{type(self.base_layer).__name__} (nor by PEFT): expected lora_bias=False")
        weight = self.base_weight_reference()
        device = device if device is not None else weight.device
        dtype = dtype if dtype is not None else weight.dtype
        self.create_factors(name, record.r, dtype, device)
        if record.lora_bias:
            rows = self.factors(name)[1].shape[0]
            self.lora_B[name].register_parameter("bias", nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters[name] = record
        if weight.dtype == torch.float16 and abs(record.scaling) >= FP16_SCALING_LIMIT:
            warnings.warn(f"adapter {name!r} has scaling {record.scaling:g} (lora_alpha {record.lora_alpha:g} / r) "
                          f"on a float16 layer: its term overflows float16 (max 65504) to Inf for inputs of order 1; "
                          f"expected a scaling below {FP16_SCALING_LIMIT} (lower lora_alpha, or use bfloat16)",
                          stacklevel=3)
        if init is not None and device.type != "meta":
            self.init_factors(name, init)
        record.variant.create(self, name)  # after init: DoRA's magnitude starts at ‖W + ΔW‖ of the initial A, B

    def delete_adapter(self, name: str) -> None:
        for container in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B,
                          self.lora_dropout):
            if name in container:
                del container[name]
        if name in self.adapters:
            self.adapters.pop(name).variant.delete(self, name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter adapter `name` owns on this layer (A, B and any the variant adds)."""
        containers: list[Any] = [c for n, c in self.named_children() if n != "base_layer"]
        return [param for container in containers if name in getattr(container, "keys", lambda: ())()
                for param in _parameters_of(container[name])]

    def running_adapters(self) -> list[str]:
        """The adapters whose term forward adds: active, on this layer, not merged, not disabled."""
        state = self.state
        if state.disabled:
            return []
        return [name for name in state.active if name in self.adapters and name not in self.merged_adapters]

    def base_weight_reference(self) -> Tensor:
        """A tensor with the device and dtype adapters are made like (a quantized base overrides it)."""
        return self.base_layer.weight

    def merge_target(self) -> Tensor:
        """The tensor merge folds updates into (a parameter wrapper: its parameter)."""
        return self.base_layer.weight

    def config_key(self, path: str) -> str:
        """The name rank_pattern/alpha_pattern match for this layer at `path` (a parameter wrapper adds its name)."""
        return path

    def pattern_key(self, key: str) -> str:
        """The name whose rank and alpha this layer takes, given its config_key: its own, unless it is built
        with another layer's (nn.MultiheadAttention's out_proj)."""
        return key

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        routing = active_routing(self.state)
        if routing is not None:  # a mixed-adapter batch: each sample its own adapter
            return mixed_lora_forward(self, routing, x, *args, **kwargs)
        names = self.running_adapters()
        if self.state.fast and len(names) == 1 and not args and not kwargs:
            fused = self.fast_forward(x, names[0])
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            result = self.adapters[name].variant.forward(self, name, x, result)
        return result

    def fast_forward(self, x: Tensor, name: str) -> Tensor | None:
        """base(x) + the adapter's term in one fused op (peftlite.fast), or None where it does not apply."""
        return None

    def lora_input(self, x: Tensor, name: str) -> Tensor:
        """dropout(x) in the factors' dtype: what lora_A sees."""
        return self.lora_dropout[name](x.to(self.factors(name)[0].dtype))

    # ---- merging ---------------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> Tensor:
        """PEFT's name for the plain ΔW of adapter `name`, shaped like the base weight."""
        return self.delta_weight(name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold each adapter's update into the base weight (default: the active ones not merged yet)."""
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapters]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapters {already!r} are already merged; merging them again is skipped", stacklevel=2)
        biased = [n for n in names if self.lora_bias_delta(n) is not None]
        if biased and getattr(self.base_layer, "bias", None) is None:
            raise ValueError(f"adapters {biased!r} have lora_bias=True but {type(self.base_layer).__name__} has no "
                             "bias to merge it into: expected a base layer with a bias (PEFT refuses this too)")
        weight = self.merge_target()
        with torch.no_grad():
            for name in names:
                if name in already:
                    continue
                new = self.adapters[name].variant.merged_weight(self, name, weight)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN or Inf into "
                                     f"{type(self.base_layer).__name__}'s weight; nothing merged here")
                if not self.merged_adapters:
                    bias = getattr(self.base_layer, "bias", None)
                    self.pre_merge = (weight.detach().clone(), None if bias is None else bias.detach().clone())
                weight.copy_(new)
                bias_delta = self.lora_bias_delta(name)
                if bias_delta is not None:
                    self.base_layer.bias.add_(bias_delta.to(self.base_layer.bias.dtype))
                self.merged_adapters.append(name)
                self.state.merged_count += 1

    def unmerge(self) -> None:
        """Take every merged update out again: the exact weight from before the first merge."""
        weight = self.merge_target()
        with torch.no_grad():
            if self.pre_merge is not None and self.merged_adapters:
                saved_weight, saved_bias = self.pre_merge
                weight.copy_(saved_weight)
                if saved_bias is not None:
                    self.base_layer.bias.copy_(saved_bias)
                self.state.merged_count -= len(self.merged_adapters)
                self.merged_adapters.clear()
            self.pre_merge = None
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_(self.adapters[name].variant.unmerged_weight(self, name, weight))
                bias_delta = self.lora_bias_delta(name)
                if bias_delta is not None:
                    self.base_layer.bias.sub_(bias_delta.to(self.base_layer.bias.dtype))
                self.state.merged_count -= 1

    def train(self, mode: bool = True) -> "LoraLayer":
        """loralib semantics for active adapters made with merge_weights=True: eval merges, train unmerges."""
        super().train(mode)
        names = [n for n in self.active_adapters if self.adapters[n].merge_weights]
        if names and mode and self.merged_adapters:
            self.unmerge()
        elif names and not mode and not self.state.disabled:
            self.merge(adapter_names=names)
        return self

    # ---- per kind ----------------------------------------------------------------------------------
    def create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        """A and B as bias-free nn.Linear modules, `lora_A[name]` and `lora_B[name]`, with the kind's 2-D
        shapes (convolutions and embeddings override this)."""
        (rank_A, in_A), (out_B, rank_B) = self.factor_shapes(r)
        self.lora_A[name] = uninitialised_linear(in_A, rank_A, dtype, device)
        self.lora_B[name] = uninitialised_linear(rank_B, out_B, dtype, device)

    def init_factors(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def factor_slots(self, name: str) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        """Where A and B of adapter `name` live: (module, attribute) each, PEFT's names.

        Most kinds hold them as modules, `lora_A[name]` and `lora_B[name]`; an embedding overrides this.
        """
        return (self.lora_A[name], "weight"), (self.lora_B[name], "weight")

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) of adapter `name` as tensors, in the shapes PEFT gives them in memory."""
        (module_A, attr_A), (module_B, attr_B) = self.factor_slots(name)
        return getattr(module_A, attr_A), getattr(module_B, attr_B)

    def set_factors(self, name: str, lora_A: Tensor, lora_B: Tensor, in_place: bool) -> None:
        """Put loaded values into A and B.

        in_place copies into the existing parameters (hotswap: a compiled graph keeps
        the storage it captured). Otherwise the values become the parameters, without a
        copy where dtype and device already match; parameters on the meta device
        (low_cpu_mem_usage) are replaced this way.
        """
        with torch.no_grad():
            for (module, attribute), value in zip(self.factor_slots(name), (lora_A, lora_B)):
                param = getattr(module, attribute)
                if in_place:
                    param.copy_(value)
                    continue
                device = self.base_weight_reference().device if param.device.type == "meta" else param.device
                if device.type == "meta":
                    device = value.device
                setattr(module, attribute, nn.Parameter(value.to(device=device, dtype=param.dtype),
                                                        requires_grad=param.requires_grad))

    def lora_term(self, x: Tensor, name: str) -> Tensor:
        """B(A(dropout(x)))·s, shaped like the base output: the textbook term, which kinds with a grouped
        or looked-up A override."""
        return self.lora_B[name](self.lora_A[name](self.lora_input(x, name))) * self.adapters[name].scaling

    def delta_weight(self, name: str) -> Tensor:
        """ΔW = B·A·s in the base weight's layout."""
        raise NotImplementedError

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) at rank r; raises ValueError if this base cannot take LoRA."""
        raise NotImplementedError

    def check_init(self, init: bool | str, r: int) -> None:
        """Raise ValueError, before any change, if this layer cannot start an adapter with `init` at rank r."""
        if init not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not supported on {type(self.base_layer).__name__} "
                             "(nor by PEFT): expected True, False or 'gaussian' there")

    def takes_lora_bias(self) -> bool:
        """Whether B may carry a bias (lora_bias=True): where lora_B[name] is a module with one, as in PEFT."""
        return False

    def lora_bias_delta(self, name: str) -> Tensor | None:
        """What adapter `name` adds to the base bias (B's bias · s), or None without lora_bias."""
        module_B = self.lora_B[name] if name in self.lora_B else None
        bias = getattr(module_B, "bias", None)
        return None if bias is None else bias * self.adapters[name].scaling

    def stacks_in_mixed_batch(self) -> bool:
        """Whether a mixed batch may stack every sample's (A, B) into one bmm pair (mixed.py)."""
        return False
