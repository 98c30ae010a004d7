"""Mixed-adapter batches, the layer side: each sample of one call runs its own adapter.

`LoraModel.forward(..., adapter_names=[...])` enters `tuner.mixed_adapters`,
which publishes a `Routing` for this call; every LoRA layer of that model then
runs `mixed_lora_forward` / `mixed_saved_forward` instead of its single-adapter
path.

Why a ContextVar: the routing belongs to one call, not to the model. A context
variable is per thread (and per asyncio task), so several threads can run the
same model at once with different `adapter_names` and never see each other's
routing; nothing global is mutated. The variable maps a model's `AdapterState`
to its routing, so another model called inside the same forward is unaffected.

Two ways to add each sample's low-rank term, both with a single adapter's FLOPs:
- a layer whose factors stack (a plain Linear whose adapters share one rank and
  dtype) stacks each sample's A and B and runs one bmm pair;
- every other layer runs one term per group of rows that share an adapter,
  through the adapter's variant. The groups are computed once per call, not per
  layer: a run of consecutive samples is a slice (a view), scattered samples use
  index_select/index_add_.

Rows: a layer's input has the batch on dim 0, either B rows (one per sample) or
m·B rows where each sample's rows are adjacent (generate's expansion for beams,
or tokens flattened to (B·T, d)), so sample b owns rows b·m … b·m + m − 1.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .base import AdapterState, LoraLayer
    from .modules_to_save import ModulesToSave

Rows = slice | Tensor  # a run of consecutive rows, or the row indices of scattered samples


class Routing:
    """Which adapter each sample of one call uses, and the row groups derived from it.

    names: one adapter name per sample (`"__base__"`: none). Groups are computed
    lazily per (row count, device) and cached, so generate's many forward steps
    and a model's many layers all reuse one grouping.
    """

    def __init__(self, state: "AdapterState", names: Sequence[str], exact_rows: bool = False) -> None:
        self.state = state
        self.names = tuple(names)
        # A forward call (not generate, which expands each sample to beams): a layer input of 3 or more
        # dims, (N, T, ...), must have N = B; N = m·B there means a model that is not batch-first.
        self.exact_rows = exact_rows
        self._groups: dict[tuple[int, torch.device], list[tuple[str, Rows]]] = {}

    def check_input(self, x: Tensor) -> None:
        if self.exact_rows and x.dim() >= 3 and x.shape[0] != len(self.names):
            raise ValueError(f"a layer input has shape {tuple(x.shape)} but adapter_names has {len(self.names)} "
                             "entries: expected the batch on dim 0 of every layer input (a time-major model "
                             "cannot take adapter_names)")

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, Rows]]:
        """[(adapter name, rows)] covering all `rows` rows of a layer input, each name once."""
        key = (rows, device)
        if key not in self._groups:
            self._groups[key] = _group_rows(self.names, rows, device)
        return self._groups[key]


def _group_rows(names: tuple[str, ...], rows: int, device: torch.device) -> list[tuple[str, Rows]]:
    batch = len(names)
    if rows % batch:
        raise ValueError(
            f"a layer input has {rows} rows on dim 0 but adapter_names has {batch} entries: "
            "expected the batch (or a multiple of it, each sample's rows adjacent) on dim 0"
        )
    per_sample = rows // batch
    members: dict[str, list[int]] = {}
    for sample, name in enumerate(names):
        members.setdefault(name, []).append(sample)
    groups: list[tuple[str, Rows]] = []
    for name, samples in members.items():
        if samples[-1] - samples[0] + 1 == len(samples):  # consecutive samples: a slice, a view
            groups.append((name, slice(samples[0] * per_sample, (samples[-1] + 1) * per_sample)))
        else:
            index = torch.tensor(samples, device=device)
            if per_sample > 1:
                index = (index[:, None] * per_sample + torch.arange(per_sample, device=device)).flatten()
            groups.append((name, index))
    return groups


# One variable for every model: {AdapterState: Routing}. Values are never mutated, only replaced.
ROUTING: contextvars.ContextVar[dict] = contextvars.ContextVar("peftlite_routing", default={})  # noqa: B039


def active_routing(state: "AdapterState") -> Routing | None:
    """The routing of the call running in this thread for the model that owns `state`, if any."""
    return ROUTING.get().get(state) if state.mixed_calls else None


def mixed_lora_forward(layer: "LoraLayer", routing: Routing, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Base output for every row, plus each group's own adapter term on its rows.

    x: (N, ...) with N = B or m·B (see the module docstring); result (N, ..., out).
    Groups whose adapter is "__base__" or not on this layer add nothing.
    """
    routing.check_input(x)
    result = layer.base_layer(x, *args, **kwargs)
    if layer.state.disabled_for_mixed_batch() or _stacked_linear_terms(layer, routing, x, result):
        return result
    for name, rows in routing.groups(x.shape[0], x.device):
        if name not in layer.adapters:
            continue
        variant = layer.adapters[name].variant
        if isinstance(rows, slice):
            result[rows] = variant.forward(layer, name, x[rows], result[rows])
        else:
            part = variant.forward(layer, name, x.index_select(0, rows), result.index_select(0, rows))
            result.index_copy_(0, rows, part)
    return result


def _stacked_linear_terms(layer: "LoraLayer", routing: Routing, x: Tensor, result: Tensor) -> bool:
    """Every sample's term in one bmm pair, in place, where the layer's factors stack.

    Fewer, larger ops than one product per group (and no gather of x): each sample's
    A and B are stacked, (B, r, in) and (B, out, r), and x is seen as (B, L, in) with
    L = its rows per sample × positions. Samples without an adapter here get A = 0.
    Returns False (nothing done) where this does not apply; the grouped path runs then.
    """
    batch = len(routing.names)
    if not layer.stacks_in_mixed_batch() or x.shape[0] % batch or not result.is_contiguous():
        return False
    names = [name if name in layer.adapters else None for name in routing.names]
    present = [name for name in names if name is not None]
    if not present:
        return True  # no sample has an adapter on this layer: the base output is the answer
    pairs = {name: layer.factors(name) for name in set(present)}
    records = {name: layer.adapters[name] for name in pairs}
    first_A, first_B = pairs[present[0]]
    if (any(A.shape != first_A.shape or A.dtype != first_A.dtype for A, _ in pairs.values())
            or any(r.variant.name != "lora" for r in records.values()) or result.dtype != first_A.dtype
            or any(not isinstance(layer.lora_dropout[n], nn.Identity) and layer.lora_dropout[n].training
                   for n in pairs)):
        return False
    zero_A, zero_B = first_A.new_zeros(first_A.shape), first_B.new_zeros(first_B.shape)
    lora_A = torch.stack([pairs[n][0] if n is not None else zero_A for n in names])  # (B, r, in)
    lora_B = torch.stack([pairs[n][1] if n is not None else zero_B for n in names])  # (B, out, r)
    scalings = [records[n].scaling if n is not None else 0.0 for n in names]
    xs = x.to(lora_A.dtype).reshape(batch, -1, x.shape[-1])  # (B, L, in)
    after_A = torch.bmm(xs, lora_A.mT)  # (B, L, r)
    alpha = scalings[0]
    if any(s != alpha for s in scalings):  # per-sample scaling on the small (B, L, r) term
        after_A.mul_(torch.tensor(scalings, dtype=after_A.dtype, device=after_A.device).view(batch, 1, 1))
        alpha = 1.0
    # (B, L, out) += (B, L, r) @ (B, r, out)
    result.view(batch, -1, result.shape[-1]).baddbmm_(after_A, lora_B.mT, alpha=alpha)
    return True


def mixed_saved_forward(module: "ModulesToSave", routing: Routing, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Each group's rows through its adapter's copy (the original for "__base__"), stitched back in order.

    x: (N, ...) split on dim 0 like a LoRA layer's input; other arguments are passed unchanged.
    A module returning a tuple (or list) of tensors gets each element stitched the same way.
    """
    routing.check_input(x)
    parts = []
    for name, rows in routing.groups(x.shape[0], x.device):
        use_copy = not module.state.disabled_for_mixed_batch() and name in module.modules_to_save
        part_module: nn.Module = module.modules_to_save[name] if use_copy else module.original_module
        parts.append((rows, part_module(x[rows] if isinstance(rows, slice) else x.index_select(0, rows),
                                        *args, **kwargs)))
    return _stitch(parts, x.shape[0])


def _stitch(parts: list[tuple[Rows, Any]], total: int) -> Any:
    """One output from per-group outputs: tensors row by row, tuples element by element."""
    first = parts[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_stitch([(rows, part[i]) for rows, part in parts], total) for i in range(len(first)))
    if not isinstance(first, Tensor):
        raise ValueError(f"a module in modules_to_save returned {type(first).__name__}: a mixed-adapter batch "
                         "expects tensors (or tuples of tensors) with the batch on dim 0")
    out = first.new_empty((total, *first.shape[1:]))
    for rows, part in parts:
        out[rows] = part
    return out
