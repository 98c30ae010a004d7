"""Mixed-adapter batches: one forward in which each sample runs with its own adapter.

`LoraModel.forward(..., adapter_names=[...])` enters `mixed_adapters(model,
names)`; inside it every LoRA layer of that model sees a `Routing` and runs
`mixed_lora_forward` / `mixed_saved_forward` instead of its single-adapter path.

Why a ContextVar: the routing belongs to one call, not to the model. A context
variable is per thread (and per asyncio task), so several threads can run the
same model at once with different `adapter_names` and never see each other's
routing; nothing global is mutated. The variable maps a model's `AdapterState`
to its routing, so another model called inside the same forward is unaffected.

Two ways to add each sample's low-rank term, both with a single adapter's FLOPs:
- a plain Linear whose adapters share one rank (the common case) stacks each
  sample's A and B and runs one bmm pair, a handful of ops per layer however
  many adapters the batch mixes (`_batched_linear_delta`);
- every other layer (fused MergedLinear, Embedding, Conv2d, unequal ranks) runs
  one low-rank product per group of rows that share an adapter. The groups are
  computed once per call, not per layer: a run of consecutive samples is a
  slice (a view, added in place), scattered samples use index_select/index_add_.

Rows: a layer's input has the batch on dim 0, either B rows (one per sample) or
m·B rows where each sample's rows are adjacent — generate's expansion for
num_beams / num_return_sequences (`repeat_interleave`) and tokens flattened to
(B·T, d) both look like this — so sample b owns rows b·m … b·m + m − 1.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from .config import BASE_NAME

if TYPE_CHECKING:  # layers.py imports this module; these names are for annotations only
    from .layers import AdapterState, LoraLayer, ModulesToSave
    from .model import LoraModel

Rows = Union[slice, Tensor]  # a run of consecutive rows, or the row indices of scattered samples


class Routing:
    """Which adapter each sample of one call uses, and the row groups derived from it.

    names: one adapter name per sample (`"__base__"`: none). Groups are computed
    lazily per (row count, device) and cached, so generate's many forward steps
    and a model's many layers all reuse one grouping.
    """

    def __init__(self, state: "AdapterState", names: Sequence[str]) -> None:
        self.state = state
        self.names = tuple(names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, Rows]]] = {}

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
_ROUTING: contextvars.ContextVar[dict] = contextvars.ContextVar("peftlite_routing", default={})


def active_routing(state: "AdapterState") -> Routing | None:
    """The routing of the call running in this thread for the model that owns `state`, if any."""
    return _ROUTING.get().get(state) if state.mixed_calls else None


def check_adapter_names(lora_model: "LoraModel", adapter_names: Any) -> list[str]:
    """Validate a mixed batch request before anything runs; returns the names as a list."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ValueError(f"adapter_names={adapter_names!r} is invalid: expected a list of adapter names, one per sample")
    if not adapter_names:
        raise ValueError("adapter_names is empty: expected one adapter name per sample")
    for name in adapter_names:
        if not isinstance(name, str):
            raise ValueError(f"adapter_names entry {name!r} is invalid: expected a string")
        if name != BASE_NAME and name not in lora_model.peft_config:
            raise KeyError(
                f"unknown adapter {name!r} in adapter_names: loaded adapters are "
                f"{sorted(lora_model.peft_config)} (or {BASE_NAME!r} for none)"
            )
    if lora_model.base_model.training:
        raise ValueError("adapter_names cannot be used in training mode: call model.eval() first")
    if lora_model.adapter_state.merged_count:
        raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first")
    return list(adapter_names)


def batch_size_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: dim 0 of the first tensor input, or None if there is none."""
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key].shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


@contextlib.contextmanager
def mixed_adapters(lora_model: "LoraModel", adapter_names: Sequence[str],
                   batch_size: int | None = None) -> Iterator[Routing]:
    """Inside the block, this thread's calls of `lora_model` run sample i with adapter_names[i].

    Raises (before anything runs): ValueError for a non-list, a wrong length, training
    mode or merged weights; KeyError for an adapter name that is not loaded.
    """
    names = check_adapter_names(lora_model, adapter_names)
    if batch_size is not None and batch_size != len(names):
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} samples: "
                         "expected one adapter name per sample")
    routing = Routing(lora_model.adapter_state, names)
    token = _ROUTING.set({**_ROUTING.get(), routing.state: routing})
    routing.state.mixed_calls.append(token)
    try:
        yield routing
    finally:
        routing.state.mixed_calls.remove(token)
        _ROUTING.reset(token)


def mixed_lora_forward(layer: "LoraLayer", routing: Routing, x: Tensor, *args, **kwargs) -> Tensor:
    """Base output for every row, plus each group's own low-rank term on its rows.

    x: (N, ...) with N = B or m·B (see the module docstring); result (N, ..., out).
    Groups whose adapter is "__base__" or not on this layer add nothing.
    """
    result = layer.base_layer(x, *args, **kwargs)
    if layer.state.disabled:
        return result
    if _batched_linear_delta(layer, routing, x, result):
        return result
    for name, rows in routing.groups(x.shape[0], x.device):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if isinstance(rows, slice):
            result[rows] += layer.lora_delta(x[rows], adapter).to(result.dtype)
        else:
            delta = layer.lora_delta(x.index_select(0, rows), adapter).to(result.dtype)
            result.index_add_(0, rows, delta)
    return result


def _batched_linear_delta(layer: "LoraLayer", routing: Routing, x: Tensor, result: Tensor) -> bool:
    """For a plain Linear whose adapters share one rank: every sample's term in one bmm pair, in place.

    Fewer, larger ops than one product per group (and no gather of x): each sample's
    A and B are stacked, (B, r, in) and (B, out, r), and x is seen as (B, L, in) with
    L = its rows per sample × positions. Samples without an adapter here get A = 0.
    Returns False (nothing done) where this does not apply; the grouped path runs then.
    """
    from .layers import Linear, MergedLinear  # layers.py imports this module

    if not isinstance(layer, Linear) or isinstance(layer, MergedLinear):
        return False
    batch = len(routing.names)
    if x.shape[0] % batch or not result.is_contiguous():
        return False
    adapters = layer.adapters
    records = [adapters[name] if name in adapters else None for name in routing.names]
    present = [record for record in records if record is not None]
    if not present:
        return True  # no sample has an adapter on this layer: the base output is the answer
    first = present[0]
    if any(a.r != first.r or a.lora_A.dtype != first.lora_A.dtype for a in present) or result.dtype != first.lora_A.dtype:
        return False
    if len(present) < batch:  # "__base__" samples, or adapters not on this layer: A = B = 0, s = 0
        zero_A, zero_B = first.lora_A.new_zeros(first.lora_A.shape), first.lora_B.new_zeros(first.lora_B.shape)
    lora_A = torch.stack([a.lora_A if a is not None else zero_A for a in records])  # (B, r, in)
    lora_B = torch.stack([a.lora_B if a is not None else zero_B for a in records])  # (B, out, r)
    scalings = [a.scaling if a is not None else 0.0 for a in records]
    xs = x.to(lora_A.dtype).reshape(batch, -1, x.shape[-1])  # (B, L, in)
    after_A = torch.bmm(xs, lora_A.mT)  # (B, L, r)
    alpha = scalings[0]
    if any(s != alpha for s in scalings):  # per-sample scaling on the small (B, L, r) term
        after_A.mul_(torch.tensor(scalings, dtype=after_A.dtype, device=after_A.device).view(batch, 1, 1))
        alpha = 1.0
    result.view(batch, -1, result.shape[-1]).baddbmm_(after_A, lora_B.mT, alpha=alpha)  # (B, L, out) += (B, L, r) @ (B, r, out)
    return True


def mixed_saved_forward(module: "ModulesToSave", routing: Routing, x: Tensor, *args, **kwargs) -> Tensor:
    """Each group's rows through its adapter's copy (the original for "__base__"), stitched back in order.

    x: (N, ...) split on dim 0 like a LoRA layer's input; other arguments are passed unchanged.
    """
    out: Tensor | None = None
    for name, rows in routing.groups(x.shape[0], x.device):
        use_copy = not module.state.disabled and name in module.modules_to_save
        part_module: nn.Module = module.modules_to_save[name] if use_copy else module.original_module
        part = part_module(x[rows] if isinstance(rows, slice) else x.index_select(0, rows), *args, **kwargs)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[rows] = part
    return out
