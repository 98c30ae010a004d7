"""LoRA layers without a model: each class and each plain function against the written-out formula.

The reference is always `base(x) + B(A(x))·s` spelled out with torch ops (or loralib's
MergedLinear for the fused case), never a stored number.

Run: .venv/bin/pytest -q tests/test_layers.py
"""

from __future__ import annotations

import math

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlite import functional as LF
from peftlite.fast import masks
from peftlite.layers import AdapterState, Conv2d, Embedding, Linear, LoraAdapter, MergedLinear, make_lora_layer
from peftlite.variants.lora import PLAIN_LORA

ATOL = 1e-5



def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def add(layer, name="a", r=4, scaling=0.5, init=False, dropout=0.0, merge_weights=False):
    """Give `layer` a plain LoRA adapter `name` and make it the active one."""
    layer.add_adapter(name, LoraAdapter(r, scaling * r, scaling, PLAIN_LORA, merge_weights), dropout, init)
    layer.state.active = (name,)


def wrap(layer_cls, base, *args, r=4, scaling=0.5, init=False, dropout=0.0, merge_weights=False, **kwargs):
    """A LoRA layer around `base` with one active adapter named "a"."""
    layer = layer_cls(base, AdapterState(), *args)
    add(layer, "a", r, scaling, init, dropout, merge_weights)
    return layer.eval()


# ---- plain functions ----------------------------------------------------------
def test_linear_delta_and_delta_weight_match_formula():
    x, A, B = torch.randn(3, 5, 10), torch.randn(4, 10), torch.randn(7, 4)
    expected = x @ A.T @ B.T * 0.25
    torch.testing.assert_close(LF.linear_delta(x, A, B, 0.25), expected)
    torch.testing.assert_close(LF.linear_delta_weight(A, B, 0.25, False), B @ A * 0.25)
    torch.testing.assert_close(LF.linear_delta_weight(A, B, 0.25, True), (B @ A * 0.25).T)
    torch.testing.assert_close(F.linear(x, LF.linear_delta_weight(A, B, 0.25, False)), expected)


def test_grouped_delta_is_each_slice_on_its_own():
    groups, r, out_slice = 3, 2, 5
    x, A, B = torch.randn(4, 6, 8), torch.randn(groups * r, 8), torch.randn(groups * out_slice, r)
    per_slice = [x @ A[g * r:(g + 1) * r].T @ B[g * out_slice:(g + 1) * out_slice].T for g in range(groups)]
    expected = torch.cat(per_slice, dim=-1) * 2.0
    torch.testing.assert_close(LF.grouped_delta(x, A, B, groups, 2.0), expected)
    delta_w = LF.grouped_delta_weight(A, B, groups, 2.0)
    assert delta_w.shape == (groups * out_slice, 8)
    torch.testing.assert_close(F.linear(x, delta_w), expected)


def test_embedding_delta_is_a_row_lookup_of_delta_weight():
    ids = torch.randint(0, 12, (2, 5))
    A, B = torch.randn(3, 12), torch.randn(6, 3)
    delta_w = LF.embedding_delta_weight(A, B, 0.5)
    torch.testing.assert_close(delta_w, (B @ A).T * 0.5)
    torch.testing.assert_close(LF.embedding_delta(ids, A, B, 0.5), delta_w[ids])


def test_conv2d_delta_equals_conv_with_delta_weight():
    base = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1, dilation=1)
    x, A, B = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(6, 4, 1, 1)
    expected = F.conv2d(F.conv2d(x, A, stride=2, padding=1), B) * 0.5
    torch.testing.assert_close(LF.conv2d_delta(x, A, B, 0.5, base), expected)
    delta_w = LF.conv2d_delta_weight(A, B, 0.5)
    torch.testing.assert_close(F.conv2d(x, delta_w, stride=2, padding=1), expected, atol=ATOL, rtol=1e-5)


# ---- initialisation ---------------------------------------------------------
@pytest.mark.parametrize("base", [nn.Linear(16, 12), Conv1D(12, 16), nn.Embedding(20, 12),
                                  nn.Conv2d(3, 12, 3, padding=1)], ids=["linear", "conv1d", "embedding", "conv2d"])
def test_default_init_gives_exactly_the_base_output(base):
    layer = make_lora_layer("base", base, AdapterState(), enable_lora=None)
    add(layer, "a", r=4, scaling=2.0, init=True)
    x = {nn.Embedding: torch.randint(0, 20, (2, 7)), nn.Conv2d: torch.randn(2, 3, 6, 6)}.get(type(base),
                                                                                           torch.randn(2, 7, 16))
    assert torch.equal(layer(x), base(x))
    lora_A, lora_B = layer.factors("a")
    if isinstance(base, nn.Embedding):  # PEFT: A zeros, B normal
        assert not lora_A.any() and lora_B.any()
    else:  # A Kaiming-uniform with a=√5 (bound 1/sqrt(fan_in)), B zeros
        fan_in = lora_A[0].numel()
        assert lora_A.abs().max() <= 1 / math.sqrt(fan_in) and lora_A.std() > 0
        assert not lora_B.any()


def test_gaussian_init_is_normal_with_std_one_over_r_and_zero_B():
    torch.manual_seed(0)
    r = 4
    layer = wrap(Linear, nn.Linear(4096, 8), r=r, init="gaussian")
    A = layer.factors("a")[0]
    assert not layer.factors("a")[1].any()
    assert abs(A.mean().item()) < 0.01
    assert A.std().item() == pytest.approx(1 / r, rel=0.03)  # PEFT: normal_(std=1/r); 1/sqrt(r) would be 0.5


def test_init_false_gives_a_nonzero_update():
    layer = wrap(Linear, nn.Linear(8, 6), init=False)
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), layer.base_layer(x))


# ---- each layer class against its formula -----------------------------------
def test_linear_matches_formula_and_wraps_without_copying():
    base = nn.Linear(10, 7)
    weight_ptr, weight_before = base.weight.data_ptr(), base.weight.detach().clone()
    layer = wrap(Linear, base, r=3, scaling=0.75)
    assert layer.base_layer is base and base.weight.data_ptr() == weight_ptr
    assert torch.equal(base.weight, weight_before)
    A, B = layer.factors("a")[0], layer.factors("a")[1]
    assert A.shape == (3, 10) and B.shape == (7, 3)
    x = torch.randn(2, 4, 10)
    expected = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * 0.75
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)


def test_conv1d_sets_fan_in_fan_out_automatically():
    base = Conv1D(7, 10)  # transformers Conv1D(nf=out, nx=in): weight (in, out)
    layer = wrap(Linear, base, r=3, scaling=0.75)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (10, 7)
    A, B = layer.factors("a")[0], layer.factors("a")[1]
    x = torch.randn(2, 4, 10)
    expected = x @ base.weight + base.bias + (x @ A.T @ B.T) * 0.75
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)
    delta = layer.delta_weight("a")
    assert delta.shape == base.weight.shape
    torch.testing.assert_close(delta, (B @ A).T * 0.75)


def test_embedding_matches_formula():
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = wrap(Embedding, base, r=3, scaling=2.0)
    A, B = layer.factors("a")[0], layer.factors("a")[1]
    assert A.shape == (3, 20) and B.shape == (6, 3)
    ids = torch.randint(0, 20, (2, 9))
    expected = base.weight[ids] + (A.T[ids] @ B.T) * 2.0
    torch.testing.assert_close(layer(ids), expected, atol=ATOL, rtol=1e-5)


def test_conv2d_matches_formula():
    base = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    layer = wrap(Conv2d, base, r=2, scaling=1.5)
    A, B = layer.factors("a")[0], layer.factors("a")[1]
    assert A.shape == (2, 3, 3, 3) and B.shape == (8, 2, 1, 1)
    x = torch.randn(2, 3, 11, 11)
    expected = base(x) + F.conv2d(F.conv2d(x, A, stride=2, padding=1), B) * 1.5
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)


def test_dropout_applies_to_the_lora_input_in_training_only():
    torch.manual_seed(0)
    layer = wrap(Linear, nn.Linear(64, 32), dropout=0.5)
    A, B = layer.factors("a")[0], layer.factors("a")[1]
    x = torch.randn(4, 64)
    base_out = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base_out + x @ A.T @ B.T * 0.5)  # eval: no dropout
    layer.train()
    torch.manual_seed(1)
    trained = layer(x)
    torch.manual_seed(1)
    dropped = x * masks.draw_dropout_mask(x, 0.5) / 0.5
    torch.testing.assert_close(trained, base_out + dropped @ A.T @ B.T * 0.5, atol=ATOL, rtol=1e-5)


# ---- merging at layer level ------------------------------------------------
@pytest.mark.parametrize("make", [lambda: wrap(Linear, nn.Linear(10, 7)), lambda: wrap(Linear, Conv1D(7, 10)),
                                  lambda: wrap(MergedLinear, nn.Linear(10, 9), [True, False, True]),
                                  lambda: wrap(Embedding, nn.Embedding(20, 6)),
                                  lambda: wrap(Conv2d, nn.Conv2d(3, 4, 3, padding=1))],
                         ids=["linear", "conv1d", "merged", "embedding", "conv2d"])
def test_merge_matches_unmerged_output_and_unmerge_restores(make):
    layer = make()
    x = torch.randint(0, 20, (2, 5)) if isinstance(layer, Embedding) else (
        torch.randn(2, 3, 6, 6) if isinstance(layer, Conv2d) else torch.randn(2, 5, 10))
    weight_before = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"] and layer.state.merged_count == 1
    assert not torch.allclose(layer.base_layer.weight, weight_before)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), unmerged, atol=ATOL, rtol=1e-5)  # the delta is in W now
    with pytest.warns(UserWarning, match="already merged"):  # as PEFT: a second merge is skipped, with a warning
        layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"] and layer.state.merged_count == 1
    layer.unmerge()
    assert layer.merged_adapters == [] and layer.state.merged_count == 0
    torch.testing.assert_close(layer.base_layer.weight, weight_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=1e-5)


def test_merge_weights_eval_merges_and_train_unmerges():
    layer = wrap(Linear, nn.Linear(10, 7), merge_weights=True).train()
    x = torch.randn(3, 10)
    unmerged = layer(x)
    layer.eval()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=1e-5)
    layer.train()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=1e-5)


# ---- MergedLinear against loralib ------------------------------------------
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable_lora", [[True, False, True], [False, True, False], [True, True, True]])
def test_merged_linear_matches_loralib(fan_in_fan_out, enable_lora):
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 12, 3 * 8, 2, 6
    ref = loralib.MergedLinear(d_in, d_out, r=r, lora_alpha=alpha, enable_lora=enable_lora,
                               fan_in_fan_out=fan_in_fan_out, merge_weights=False)
    with torch.no_grad():
        ref.lora_B.normal_()  # loralib zero-inits B; make the update visible
    ref.eval()
    # The same base weights in the layer transformers would have: Conv1D stores (in, out) like loralib's transpose.
    base = Conv1D(d_out, d_in) if fan_in_fan_out else nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(ref.weight)
        base.bias.copy_(ref.bias)
    layer = wrap(MergedLinear, base, enable_lora, r=r, scaling=alpha / r)
    lora_A, lora_B = layer.factors("a")
    assert lora_A.shape == ref.lora_A.shape and lora_B.shape == ref.lora_B.shape
    with torch.no_grad():
        lora_A.copy_(ref.lora_A)
        lora_B.copy_(ref.lora_B)
    x = torch.randn(2, 5, d_in)
    expected = ref(x)  # loralib's unmerged forward
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)
    # ΔW in the base weight's own layout ((in, out) for fan_in_fan_out), as loralib's merge_AB gives it.
    torch.testing.assert_close(layer.delta_weight("a"), ref.merge_AB() * ref.scaling)
    # Our merge against our unmerged output, and the merged weight against loralib's merged weight.
    layer.merge(adapter_names=["a"])
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-5)
    ref.merge_weights = True
    ref.eval()
    assert ref.merged
    torch.testing.assert_close(base.weight, ref.weight, atol=1e-6, rtol=0)


def test_merged_linear_disabled_slices_get_exactly_zero_update():
    base = nn.Linear(12, 3 * 8)
    weight_before = base.weight.detach().clone()
    layer = wrap(MergedLinear, base, [True, False, True], r=2, scaling=3.0)
    x = torch.randn(2, 5, 12)
    update = layer(x) - base(x)
    assert torch.equal(update[..., 8:16], torch.zeros_like(update[..., 8:16]))
    assert update[..., :8].abs().min() > 0 and update[..., 16:].abs().min() > 0
    layer.merge(adapter_names=["a"])
    assert torch.equal(base.weight[8:16], weight_before[8:16])
    assert not torch.equal(base.weight[:8], weight_before[:8])


def test_merged_linear_rejects_slices_that_do_not_divide_the_output():
    with pytest.raises(ValueError, match=r"enable_lora=\[True, False\].*25"):
        MergedLinear(nn.Linear(4, 25), AdapterState(), [True, False])


# ---- adapter switching at layer level --------------------------------------
def test_no_active_adapter_or_disabled_gives_the_base_output():
    layer = wrap(Linear, nn.Linear(10, 7))
    x = torch.randn(3, 10)
    base_out = layer.base_layer(x)
    layer.state.disabled = True
    assert torch.equal(layer(x), base_out)
    layer.state.disabled, layer.state.active = False, ()
    assert torch.equal(layer(x), base_out)
    layer.state.active = ("other",)  # an adapter this layer does not hold
    assert torch.equal(layer(x), base_out)


def test_conv2d_with_groups_is_rejected():
    with pytest.raises(ValueError, match="groups=3"):
        wrap(Conv2d, nn.Conv2d(3, 6, 3, groups=3))


def test_unsupported_module_is_rejected_naming_its_type():
    with pytest.raises(ValueError, match="LayerNorm"):
        make_lora_layer("norm", nn.LayerNorm(4), AdapterState(), None)
