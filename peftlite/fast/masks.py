"""Dropout masks for the training Functions: drawn fast, kept as bits, applied a block at a time.

A mask M (bools shaped like the input x) stands for D(x) = x ⊙ M / (1 - p). The Functions in
`linear.py` and `conv.py` never form D(x) whole: they keep M, packed eight to a byte, and multiply x by it
a block of rows at a time. The plain path (`dropout`) uses the same masks, so the two compute the
same numbers for the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def draw_dropout_mask(x: Tensor, p: float) -> Tensor:
    """The keep-mask of dropout(x, p): bools shaped like x (1 byte an element, not 4).

    Each element compares one uniform 16-bit integer with a threshold, so it is kept with
    probability 1 - p, p taken to the nearest multiple of 2⁻¹⁶ (0.1 becomes 0.100006). On CPU
    the integers come from numpy's SFC64 generator, seeded by one draw from torch's default
    generator, because torch's own CPU generator makes one draw at a time through MT19937,
    which is slow next to a training step (benchmarks/train_step.py). So `torch.manual_seed`
    fixes the mask and checkpointing's RNG restore
    replays it, but the bits differ from `nn.Dropout`'s for the same seed (and, under
    torch.compile, which draws from torch's generator, from eager mode's).
    """
    if not numpy_serves(x):
        return mask_from_device_generator(x, p)
    draws = Int16Draws(_seed_from_torch()).take(x.numel())
    return torch.from_numpy(draws >= _keep_threshold(p)).view(x.shape)  # numpy compares faster than torch here


def keep_mask_blocks(x2: Tensor, p: float, blocks: list[slice]):
    """`draw_dropout_mask(x2, p)` a block of rows at a time, on CPU: the same bits, never whole.

    x2 (N, in); `blocks` are consecutive slices of its rows from 0 to N. Yields one bool tensor
    (rows, in) per block, written into the same buffer each time: use it before the next.
    """
    draws, threshold = Int16Draws(_seed_from_torch()), _keep_threshold(p)
    width = x2.shape[1]
    keep = np.empty((max(rows.stop - rows.start for rows in blocks), width), dtype=bool)
    for rows in blocks:
        count = rows.stop - rows.start
        block = np.greater_equal(draws.take(count * width).reshape(count, width), threshold, out=keep[:count])
        yield torch.from_numpy(block)


class Int16Draws:
    """Uniform int16 values from one SFC64 stream, taken in pieces of any size.

    Each 64-bit draw gives four; what a piece leaves of its last draw starts the next piece, so
    the values are the same however the elements are split into pieces.
    """

    def __init__(self, seed: int) -> None:
        self.bits = np.random.SFC64(seed)
        self.spare = np.empty(0, dtype=np.int16)

    def take(self, count: int) -> np.ndarray:
        fresh = self.bits.random_raw(_draws_for(count - len(self.spare))).view(np.int16)
        values = np.concatenate((self.spare, fresh)) if len(self.spare) else fresh
        self.spare = values[count:]
        return values[:count]


def _seed_from_torch() -> int:
    """One draw from torch's default CPU generator: what `torch.manual_seed` and checkpointing fix."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def numpy_serves(t: Tensor) -> bool:
    """Whether numpy may work on t: a CPU tensor outside torch.compile (numpy breaks the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def mask_from_device_generator(x: Tensor, p: float) -> Tensor:
    """The same kind of mask from the generator of x's device (CUDA and others)."""
    draws = torch.randint(-2**63, 2**63 - 1, (_draws_for(x.numel()),), dtype=torch.int64, device=x.device)
    return (draws.view(torch.int16)[:x.numel()] >= _keep_threshold(p)).view(x.shape)


def _draws_for(count: int) -> int:
    return (count + 3) // 4  # 64-bit draws, four 16-bit integers each


def _keep_threshold(p: float) -> int:
    """A uniform int16 at or above this is kept: probability 1 - round(p·2¹⁶)/2¹⁶."""
    return round(p * 2**16) - 2**15


def as_bytes(mask: Tensor) -> Tensor:
    """The bool mask viewed as 0/1 uint8, no copy: `x * mask` then takes torch's fast mixed-dtype
    path (faster than multiplying by a bool tensor on CPU)."""
    return mask.view(torch.uint8)


def pack_rows(mask: Tensor) -> Tensor:
    """A CPU bool mask (N, in) as bits, eight to a byte along each row: (N, ⌈in/8⌉) uint8."""
    return torch.from_numpy(np.packbits(mask.numpy(), axis=1))


def mask_rows(stored: Tensor, rows: slice, width: int) -> Tensor:
    """Rows of a mask from `pack_rows` (or a bool mask) as 0/1 uint8, (len(rows), width)."""
    if stored.dtype == torch.bool:
        return as_bytes(stored[rows])
    return torch.from_numpy(np.unpackbits(stored[rows].numpy(), axis=1, count=width))


def apply_dropout_mask(x: Tensor, mask: Tensor, p: float) -> Tensor:
    """x · mask / (1 - p), the value F.dropout returns for that mask."""
    return x * mask.to(x.dtype).div_(1 - p)


def dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout with `draw_dropout_mask`: the plain-path twin of the Functions' masks."""
    return apply_dropout_mask(x, draw_dropout_mask(x, p), p) if p > 0 else x
