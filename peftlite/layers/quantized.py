"""LoRA over bitsandbytes-quantized linear layers (QLoRA): `Linear4bit` (nf4/fp4) and `Linear8bitLt`.

Forward is the quantized layer's own output plus the low-rank term, computed in the
factors' dtype (float32 by default, as PEFT makes them over a quantized base) and cast
to the output's dtype: h = base(x) + B(A(dropout(x))) · s. Training never touches the
packed weight or its quant state; only A and B get gradients.

Merging has to requantize: W' = quantize(dequantize(W) + ΔW), which rounds, so it
warns (as PEFT does). Unlike PEFT, unmerge does not requantize a second time: the
first merge keeps the packed weight object it replaced (`PackedWeight`) and unmerge
puts it back, so the exact bytes return. A later merge starts again from those
bytes, so merging adapters one by one rounds once, not once per adapter.

peftlite never imports bitsandbytes itself (it costs seconds and logs a warning on
import): a model with bitsandbytes layers was built by code that imported it, so the
module is read from `sys.modules`.
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import fast
from .base import AdapterState
from .linear import Linear

QUANTIZED_TYPE_NAMES = ("bitsandbytes.nn.Linear4bit", "bitsandbytes.nn.Linear8bitLt")


def bitsandbytes() -> Any:
    """The bitsandbytes module if something imported it, else None."""
    return sys.modules.get("bitsandbytes")


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is exactly a bitsandbytes Linear4bit or Linear8bitLt (not a subclass)."""
    bnb = bitsandbytes()
    return bnb is not None and type(module) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_4bit(weight: Tensor) -> bool:
    """A Linear4bit's Params4bit (else a Linear8bitLt's Int8Params)."""
    return isinstance(weight, bitsandbytes().nn.Params4bit)


class PackedWeight(NamedTuple):
    """A quantized layer's weight as loaded: the Parameter object itself and, for 8-bit, the row-major
    int8 matrix (CB) and row scales (SCB) its matmul state took over from it on the first forward."""

    weight: Any  # a bitsandbytes Params4bit or Int8Params
    state_CB: Tensor | None
    state_SCB: Tensor | None


def snapshot(base: Any) -> PackedWeight:
    state = getattr(base, "state", None)  # Linear8bitLt's MatmulLtState; Linear4bit has none
    return PackedWeight(base.weight, getattr(state, "CB", None), getattr(state, "SCB", None))


def restore(base: Any, packed: PackedWeight) -> None:
    """Put the exact packed weight (and 8-bit matmul state) of `snapshot` back into `base`."""
    base.weight = packed.weight
    if is_4bit(packed.weight):
        base.quant_state = packed.weight.quant_state
    else:
        base.state.CB, base.state.SCB = packed.state_CB, packed.state_SCB


def dequantize(packed: PackedWeight) -> Tensor:
    """The weight as a float (out, in) matrix: 4-bit in its quant state's dtype, 8-bit in float32.

    On CPU, bitsandbytes repacks a Linear4bit's weight in place for its inference kernel on
    the first eval forward (`packing_format_for_cpu`); that layout is undone on copies first.
    """
    bnb = bitsandbytes()
    weight = packed.weight
    if is_4bit(weight):
        data, quant_state = weight.data, weight.quant_state
        if getattr(quant_state, "packing_format_for_cpu", False):
            data, quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                data.clone(), copy.deepcopy(quant_state))
        return bnb.functional.dequantize_4bit(data, quant_state)
    scales = packed.state_SCB if packed.state_SCB is not None else weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def requantize(base: Any, dense: Tensor, like: PackedWeight) -> None:
    """Quantize `dense` (out, in) into `base` with the settings of `like` (as PEFT's merge does)."""
    bnb = bitsandbytes()
    old = like.weight
    if is_4bit(old):
        base.weight = bnb.nn.Params4bit(
            dense.to("cpu"), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=base).to(old.device)  # .to quantizes (and sets base.quant_state)
    else:
        base.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                        has_fp16_weights=old.has_fp16_weights).to(old.device)
        base.state.reset_grads()  # the next forward takes CB and SCB from the new weight


class QuantizedLinear(Linear):
    """LoRA on a bitsandbytes Linear4bit or Linear8bitLt: Linear's factors and term over a packed base.

    packed: the weight as loaded, kept while anything is merged (None otherwise).
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__(base_layer, state)
        self.packed: PackedWeight | None = None

    def base_weight_reference(self) -> Tensor:
        """Adapters are float32 on the packed weight's device (PEFT's default over a quantized base)."""
        return torch.empty(0, dtype=torch.float32, device=self.base_layer.weight.device)

    def merge_target(self) -> Tensor:
        """The base weight as it computes now (merged adapters included), dequantized: a new float (out, in)
        tensor to check or read, since merge here requantizes instead of writing into it."""
        return dequantize(snapshot(self.base_layer))

    def fast_forward(self, x: Tensor, name: str) -> Tensor | None:
        """4-bit training through the fused node (peftlite.fast.linear), W dequantized in forward and again
        in backward, as bitsandbytes' own 4-bit matmul does. 8-bit layers and inference run the reference:
        bitsandbytes' int8 matmul and its CPU inference kernel are not a plain x·Wᵀ."""
        base, record = self.base_layer, self.adapters[name]
        lora_A, lora_B = self.factors(name)
        if record.variant.name != "lora" or record.lora_bias or not is_4bit(base.weight):
            return None
        quant_state = base.weight.quant_state
        if (quant_state is None or getattr(quant_state, "packing_format_for_cpu", False)
                or tuple(quant_state.shape) != (self.out_features, self.in_features)
                or not fast.packed_linear_applies(base, bitsandbytes().nn.Linear4bit.forward, x, lora_A, lora_B,
                                                  quant_state.dtype)):
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        dense = functools.partial(bitsandbytes().functional.dequantize_4bit, quant_state=quant_state)
        return fast.lora_linear(x, base.weight, base.bias, lora_A, lora_B, record.scaling, dropout=p, dense=dense)

    def merged_dense(self, names: list[str]) -> Tensor:
        """dequantize(W as loaded) with `names` folded in, in W's float dtype."""
        packed = self.packed if self.packed is not None else snapshot(self.base_layer)
        weight = dequantize(packed)
        merged = weight.float()
        for name in names:
            merged = self.adapters[name].variant.merged_weight(self, name, merged)
        return merged.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Requantize W + ΔW of each adapter (default: the active ones not merged yet); warns that this rounds."""
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapters]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapters {already!r} are already merged; merging them again is skipped", stacklevel=2)
        todo = [n for n in names if n not in already]
        if not todo:
            return
        biased = [(n, delta) for n in todo if (delta := self.lora_bias_delta(n)) is not None]
        if biased and self.base_layer.bias is None:
            raise ValueError(f"adapters {[n for n, _ in biased]!r} have lora_bias=True but "
                             f"{type(self.base_layer).__name__} has no bias to merge it into: expected a base "
                             "layer with a bias (PEFT refuses this too)")
        with torch.no_grad():
            packed = self.packed if self.packed is not None else snapshot(self.base_layer)
            merged = self.merged_dense(self.merged_adapters + todo)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapters {todo!r} would put NaN or Inf into "
                                 f"{type(self.base_layer).__name__}'s weight; nothing merged here")
            warnings.warn(f"merging into a {type(self.base_layer).__name__} requantizes its weight, which rounds: "
                          "outputs differ slightly from the unmerged adapter's (unmerge restores the exact "
                          "packed weight; dequantize_and_merge gives a float model instead)", stacklevel=2)
            requantize(self.base_layer, merged, packed)
            for _, delta in biased:
                self.base_layer.bias.add_(delta.to(self.base_layer.bias.dtype))
        self.packed = packed
        self.merged_adapters += todo
        self.state.merged_count += len(todo)

    def unmerge(self) -> None:
        """Put back the exact packed weight the first merge replaced."""
        if self.packed is None:
            return
        with torch.no_grad():
            for name in reversed(self.merged_adapters):
                delta = self.lora_bias_delta(name)
                if delta is not None:
                    self.base_layer.bias.sub_(delta.to(self.base_layer.bias.dtype))
            restore(self.base_layer, self.packed)
        self.state.merged_count -= len(self.merged_adapters)
        self.merged_adapters.clear()
        self.packed = None

    def dequantized_base(self, names: list[str], dtype: torch.dtype | None = None) -> nn.Linear:
        """A float nn.Linear computing W + Σ ΔW of `names` (plus merged ones) and the base bias: the layer
        `dequantize_and_merge` puts in this one's place."""
        base = self.base_layer
        with torch.no_grad():
            weight = self.merged_dense(self.merged_adapters + [n for n in names if n not in self.merged_adapters])
            dtype = dtype if dtype is not None else weight.dtype
            linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                               dtype=dtype, device=weight.device)
            linear.weight.copy_(weight)
            if base.bias is not None:
                bias = base.bias.detach().clone()
                for name in names:
                    delta = self.lora_bias_delta(name)
                    if delta is not None and name not in self.merged_adapters:
                        bias += delta.to(bias.dtype)
                linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear


def undo_cpu_inference_packing(model: nn.Module) -> int:
    """Put every Linear4bit weight that bitsandbytes repacked for CPU inference back into its standard layout.

    bitsandbytes repacks a Linear4bit's weight in place on the first CPU forward in eval
    mode without gradients (`packing_format_for_cpu`); its kernel for that layout passes no
    gradient to the input, so training afterwards would stop reaching earlier layers. The
    inverse is what bitsandbytes' own state_dict runs. Returns how many weights it converted.
    """
    bnb = bitsandbytes()
    converted = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if bnb is None or not isinstance(weight, bnb.nn.Params4bit):
            continue
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            with torch.no_grad():
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
            converted += 1
    return converted
