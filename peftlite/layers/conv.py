"""LoRA on nn.Conv1d, nn.Conv2d and nn.Conv3d.

lora_A[name] is a convolution like the base (its kernel, stride, padding,
dilation and padding mode) with r output channels; lora_B[name] a 1×…×1
convolution from r to the base's output channels. ΔW = B·A·s per kernel tap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import fast
from .. import functional as LF
from .base import LoraLayer


class Conv(LoraLayer):
    """LoRA on a convolution of any dimension (the base's weight is (out, in, *kernel))."""

    @property
    def conv_type(self) -> type[nn.Conv1d | nn.Conv2d | nn.Conv3d]:
        return CONV_BY_DIMS[self.base_layer.weight.dim()]

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        if base.groups != 1:
            raise ValueError(f"{type(base).__name__} with groups={base.groups} cannot take LoRA: expected groups=1")
        ones = (1,) * len(base.kernel_size)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones)

    def create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.utils.skip_init(self.conv_type, base.in_channels, r, base.kernel_size, base.stride,
                                               base.padding, base.dilation, bias=False,
                                               padding_mode=base.padding_mode, dtype=dtype, device=device)
        self.lora_B[name] = nn.utils.skip_init(self.conv_type, r, base.out_channels, 1, bias=False, dtype=dtype,
                                               device=device)

    def init_factors(self, name: str, init: bool | str) -> None:
        LF.init_lora_pair(*self.factors(name), init)

    def takes_lora_bias(self) -> bool:
        return True

    def delta_weight(self, name: str) -> Tensor:
        lora_A, lora_B = self.factors(name)
        delta = lora_B.flatten(1) @ lora_A.flatten(1)  # (out, in·k…)
        return delta.view(lora_B.shape[0], *lora_A.shape[1:]) * self.adapters[name].scaling

    def fast_forward(self, x: Tensor, name: str) -> Tensor | None:
        """One fused node (peftlite.fast.conv) for a plain zero-padded Conv2d."""
        lora_A, lora_B = self.factors(name)
        record, base = self.adapters[name], self.base_layer
        if record.variant.name != "lora" or record.lora_bias or not fast.conv2d_applies(base, x, lora_A, lora_B):
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return fast.lora_conv2d(x, base.weight, base.bias, lora_A, lora_B, record.scaling,
                                base.stride, base.padding, base.dilation, p)


CONV_BY_DIMS: dict[int, type[nn.Conv1d | nn.Conv2d | nn.Conv3d]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
Conv1d = Conv2d = Conv3d = Conv  # PEFT's names; one class serves every dimension
