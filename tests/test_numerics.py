"""Numerics of merging: repeated merge/unmerge does not drift, and safe_merge refuses NaN/Inf.

Drift: merging adds ΔW = B @ A · s in float32 and unmerging subtracts the same ΔW, so each
cycle may round, but 1,000 cycles must stay within 1e-5 of the original weights (every layer
kind: Linear, Conv1D with fan_in_fan_out, fused MergedLinear, Embedding, Conv2d).

safe_merge: every layer's merged weight is checked before any layer is changed, so a refused
merge leaves every weight bit-identical. (PEFT checks layer by layer: with the broken adapter
on a later layer, its earlier layers are already merged when it raises.)

Run: .venv/bin/pytest -q tests/test_numerics.py
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    MLP,
    ConvNet,
    assert_same_fingerprint,
    model_fingerprint,
    tiny_gpt2,
    token_batch,
)

from peftlite import LoraConfig, get_lora_model

CYCLES = 1000
MAX_DRIFT = 1e-5


def conv_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 16, (2, 5), generator=gen)


# (name, model factory, config kwargs, inputs)
CASES = [
    ("gpt2 Conv1D", tiny_gpt2, dict(target_modules=["c_proj", "c_fc"]), lambda: (token_batch(),)),
    ("gpt2 fused", tiny_gpt2, dict(target_modules=["c_attn"], enable_lora=[True, False, True]),
     lambda: (token_batch(),)),
    ("conv, embedding, linear", ConvNet, dict(target_modules=["emb", "conv", "head"]), conv_inputs),
]


def output(model, inputs):
    out = model(*inputs)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name,make,kwargs,inputs", CASES, ids=[c[0] for c in CASES])
def test_a_thousand_merge_unmerge_cycles_do_not_drift(name, make, kwargs, inputs):
    # Large non-zero updates (|ΔW| up to ~10, far above the ~0.1 weights) make rounding show.
    model = get_lora_model(make(), LoraConfig(init_lora_weights=False, lora_alpha=32, **kwargs))
    inputs = inputs()
    weights = {path: layer.weight.detach().clone() for path, layer in model.lora_layers()}
    expected = output(model, inputs)
    model.merge_adapter()
    merged = output(model, inputs)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)  # merging is the same function
    model.unmerge_adapter()
    for _ in range(CYCLES - 1):
        model.merge_adapter()
        model.unmerge_adapter()
    for path, layer in model.lora_layers():
        drift = (layer.weight - weights[path]).abs().max().item()
        assert drift < MAX_DRIFT, f"{path}: weight drifted by {drift} after {CYCLES} cycles"
    drift = (output(model, inputs) - expected).abs().max().item()
    assert drift < MAX_DRIFT, f"output drifted by {drift} after {CYCLES} cycles"


def break_with_nan(lora_A, lora_B) -> None:
    lora_B[1, 0] = float("nan")


def break_with_inf(lora_A, lora_B) -> None:
    lora_A[0, 3] = float("-inf")


def break_by_overflow(lora_A, lora_B) -> None:
    """Every entry finite, but row 1 of B @ A is 1e38 · 100 summed over r: beyond float32's 3.4e38."""
    lora_B[1, :] = 1e38
    lora_A[:, 0] = 100.0


@pytest.mark.parametrize("breaks", [break_with_nan, break_with_inf, break_by_overflow])
def test_safe_merge_refuses_nan_or_inf_and_leaves_weights_bit_identical(breaks):
    # Adapters "good" (active) and "bad" on lin0, lin1 and head; "bad" is broken only on head, the last layer.
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0", "lin1", "head"], init_lora_weights=False),
                           adapter_name="good")
    model.add_adapter("bad", LoraConfig(target_modules=["lin0", "lin1", "head"], init_lora_weights=False))
    with torch.no_grad():
        breaks(*model.base_model.head.factors("bad"))
    x = torch.randn(3, 10)
    before, out = model_fingerprint(model), model(x)
    calls = [lambda: model.merge_adapter(["bad"], safe_merge=True),
             lambda: model.merge_adapter(["good", "bad"], safe_merge=True),  # "good" must not merge either
             lambda: model.merge_and_unload(["good", "bad"], safe_merge=True)]
    for call in calls:
        with pytest.raises(ValueError, match="'bad'.*NaN or Inf"):
            call()
        assert_same_fingerprint(before, model_fingerprint(model))
        assert torch.equal(model(x), out)
    # The good adapter alone still merges, and the result is the unmerged model's function.
    plain = model.merge_and_unload(["good"], safe_merge=True)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-6)


def test_safe_merge_catches_overflow_in_the_weight_dtype():
    """ΔW = 1e5 is finite in float32 but overflows float16 (max 65504) once added to the weight."""
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.half()
    with torch.no_grad():
        lora_A, lora_B = model.base_model.lin1.factors("default")
        lora_A.zero_()
        lora_B.zero_()
        lora_A[0, 0], lora_B[0, 0] = 1000.0, 100.0  # s = 1: ΔW[0, 0] = 1e5
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match="'default'.*NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert_same_fingerprint(before, model_fingerprint(model))


def test_safe_merge_checks_embedding_and_conv_layers():
    for path in ("emb", "conv"):
        model = get_lora_model(ConvNet(), LoraConfig(target_modules=["emb", "conv", "head"], init_lora_weights=False))
        with torch.no_grad():
            model.get_base_model().get_submodule(path).factors("default")[1].view(-1)[0] = float("inf")
        before = model_fingerprint(model)
        with pytest.raises(ValueError, match="NaN or Inf"):
            model.merge_adapter(safe_merge=True)
        assert_same_fingerprint(before, model_fingerprint(model))


def test_unsafe_merge_of_a_finite_adapter_equals_the_written_out_formula():
    """merge adds exactly s · B @ A (the reference the drift test leans on)."""
    model = get_lora_model(MLP(), LoraConfig(target_modules=["lin1"], r=4, lora_alpha=12, init_lora_weights=False))
    layer = model.base_model.lin1
    lora_A, lora_B = layer.factors("default")
    expected = layer.weight.detach() + (lora_B @ lora_A).detach() * (12 / 4)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)


def test_fan_in_fan_out_on_a_linear_is_ignored_so_merging_stays_exact():
    """nn.Linear stores (out, in); a config's fan_in_fan_out=True once transposed ΔW on merge (wrong on a square
    layer, a shape error on another). As in PEFT it is ignored with a warning."""
    with pytest.warns(UserWarning, match="fan_in_fan_out=True ignored"):
        model = get_lora_model(MLP(), LoraConfig(target_modules=["lin1", "lin0"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
