"""DoRA (use_dora=True) and lora_bias=True against real PEFT 0.21.2.

Run: .venv/bin/python -m pytest -q tests/test_dora.py -p no:cacheprovider

Each case wraps the same tiny model in PEFT and in peftlite with the same
weights (written by one library, read by the other) and compares outputs,
gradients after one backward, merged outputs and saved files.
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftlite
from peftlite import fast
from peftlite.fast import linear as fast_linear
from peftlite.fast.dora import DoraLinearFunction
from peftlite.variants.dora import DoraMagnitude, row_norm
from tests.tiny_models import tiny_gpt2


class Seq(nn.Module):
    """Embedding → Linear → GPT-2 Conv1D → Linear head: every DoRA layer kind that takes token ids."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.c1d = Conv1D(14, 10)  # nf=out 14, nx=in 10: weight (10, 14)
        self.head = nn.Linear(14, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c1d(torch.tanh(self.lin(self.emb(ids))))))


class ConvNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, bias=False)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv(x))).flatten(1))


SEQ = dict(target_modules=["emb", "lin", "c1d"])
CONV = dict(target_modules=["conv", "conv2"])
CASES = {
    "seq": (Seq, SEQ, lambda: torch.randint(0, 20, (3, 5))),
    "seq-rslora-patterns": (Seq, dict(SEQ, use_rslora=True, rank_pattern={"lin": 6}, alpha_pattern={"c1d": 3.0}),
                            lambda: torch.randint(0, 20, (3, 5))),
    "conv": (ConvNet, CONV, lambda: torch.randn(2, 3, 8, 8)),
}


def peft_model(case: str, **extra: object) -> peft.PeftModel:
    """A PEFT DoRA model with random A, B and a magnitude moved off its initial norm (so every term counts)."""
    model_cls, fields, _ = CASES[case]
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False, **fields,
                                **extra})
    model = peft.get_peft_model(model_cls(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand_like(param))
    return model


def ids_for(case: str) -> torch.Tensor:
    torch.manual_seed(2)
    return CASES[case][2]()


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to 1e-5 of the gradient's scale (float32 sums in another order differ in the last bits)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_dora_loads_with_peft_outputs(case: str, low_cpu_mem_usage: bool, tmp_path) -> None:
    reference = peft_model(case).eval()
    reference.save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path),
                                              low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert not any(p.is_meta for p in ours.parameters())
    x = ids_for(case)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_load_in_peft_with_same_outputs_and_keys(case: str, tmp_path) -> None:
    model_cls, fields, _ = CASES[case]
    config = peftlite.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, **fields)
    ours = peftlite.get_peft_model(model_cls(), config).eval()
    ours.save_pretrained(tmp_path / "ours")
    peft_model(case).save_pretrained(tmp_path / "peft")
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    reference = peft.PeftModel.from_pretrained(model_cls(), tmp_path / "ours").eval()
    x = ids_for(case)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), ours(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout, fast", [(0.0, True), (0.0, False), (0.3, False)])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_peft(case: str, dropout: float, fast: bool, tmp_path) -> None:
    """One backward in train mode: ∂A, ∂B and ∂m equal PEFT's, on the fused path and the reference one
    (with dropout the reference path: torch's dropout, so one seed draws the same mask in both)."""
    reference = peft_model(case, lora_dropout=dropout)
    reference.save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path), is_trainable=True)
    ours.use_fast_path(fast)
    if fast and case.startswith("seq"):
        out = ours.base_model.model.lin(torch.randn(2, 12))
        assert type(out.grad_fn).__name__.startswith("DoraLinearFunction")  # the fused path did run
    x = ids_for(case)
    for model in (reference, ours):
        model.train()
        torch.manual_seed(3)
        model(x).square().sum().backward()
    expected, got = lora_grads(reference), lora_grads(ours)
    assert set(got) == set(expected) and any("magnitude" in n for n in got)
    for name in expected:
        assert_grad_close(got[name], expected[name], name)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_merge_and_unload_keep_outputs(case: str, tmp_path) -> None:
    peft_model(case).save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path)).eval()
    x = ids_for(case)
    with torch.no_grad():
        expected = ours(x)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
        plain = ours.merge_and_unload()
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)


def test_merged_weights_equal_peft_merge(tmp_path) -> None:
    reference = peft_model("seq").eval()
    reference.save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path)).eval()
    expected = reference.merge_and_unload().state_dict()
    got = ours.merge_and_unload().state_dict()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_new_dora_adapter_matches_peft_init_and_starts_at_base() -> None:
    """A fresh DoRA adapter (B = 0) has m = ‖W‖ per row, PEFT's, and gives the base output."""
    reference = peft.get_peft_model(Seq(), peft.LoraConfig(r=4, use_dora=True, **SEQ))
    ours = peftlite.get_peft_model(Seq(), peftlite.LoraConfig(r=4, use_dora=True, **SEQ))
    magnitudes = {n: p for n, p in ours.named_parameters() if "magnitude" in n}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    for name, param in reference.named_parameters():
        if "magnitude" in name:
            torch.testing.assert_close(magnitudes[name], param, rtol=1e-5, atol=1e-6)
    x = ids_for("seq")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), Seq()(x), rtol=1e-5, atol=1e-6)


def test_rank_r_norm_equals_the_formed_matrix_norm() -> None:
    torch.manual_seed(0)
    weight, lora_A, lora_B = torch.randn(7, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64), \
        torch.randn(7, 3, dtype=torch.float64)
    expected = torch.linalg.vector_norm(weight + 0.7 * lora_B @ lora_A, dim=1)
    torch.testing.assert_close(row_norm(weight, lora_A, lora_B, 0.7), expected)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_dora_node_gradients(fold: bool, fan_in_fan_out: bool, with_bias: bool, monkeypatch) -> None:
    """DoraLinearFunction's hand-written backward against autograd (float64), both routes, and its
    output against g ⊙ (x Wᵀ + s·B(A(x))) + b written out; the no-grad route too. The rows are cut
    into blocks of two, as a long batch is."""
    monkeypatch.setattr(fast_linear, "MASKED_BLOCK_BYTES", 2 * 5 * 8)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64) if fan_in_fan_out else torch.randn(4, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    lora_A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    args = (x, weight, bias, lora_A, lora_B, gain, 0.7, fan_in_fan_out, fold, None)
    assert torch.autograd.gradcheck(DoraLinearFunction.apply, args)
    oriented = weight.T if fan_in_fan_out else weight
    expected = gain * (x @ oriented.T + 0.7 * (x @ lora_A.T) @ lora_B.T) + (bias if with_bias else 0)
    torch.testing.assert_close(DoraLinearFunction.apply(*args), expected)
    with torch.no_grad():
        inference = fast.dora_linear(x, weight, bias, lora_A, lora_B, gain, 0.7, fan_in_fan_out, fold)
        folded = fast.folded_weight(weight, lora_A, lora_B, 0.7, fan_in_fan_out)  # formed by the caller for the norm
        given = fast.dora_linear(x, weight, bias, lora_A, lora_B, gain, 0.7, fan_in_fan_out, fold, folded=folded)
    torch.testing.assert_close(inference, expected.detach())
    torch.testing.assert_close(given, expected.detach())
    given = fast.dora_linear(x, weight, bias, lora_A, lora_B, gain, 0.7, fan_in_fan_out, fold,
                             folded=fast.folded_weight(weight, lora_A, lora_B, 0.7, fan_in_fan_out).detach())
    torch.testing.assert_close(given, expected)
    torch.testing.assert_close(torch.autograd.grad(given.sum(), [x, lora_A, lora_B, gain]),
                               torch.autograd.grad(expected.sum(), [x, lora_A, lora_B, gain]))


def test_norm_cache_follows_weight_changes() -> None:
    """The cached norm is reused while W, A, B are unchanged and recomputed after an in-place update of any."""
    torch.manual_seed(0)
    weight, lora_A, lora_B = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    magnitude = DoraMagnitude(torch.ones(5))
    first = magnitude.row_norm(weight, lora_A, lora_B, 2.0)
    assert magnitude.row_norm(weight, lora_A, lora_B, 2.0) is first
    for tensor in (weight, lora_A, lora_B):
        tensor.add_(0.5)
        expected = torch.linalg.vector_norm(weight + 2.0 * lora_B @ lora_A, dim=1)
        torch.testing.assert_close(magnitude.row_norm(weight, lora_A, lora_B, 2.0), expected)
    torch.testing.assert_close(magnitude.row_norm(weight, lora_A, lora_B, 1.0),
                               torch.linalg.vector_norm(weight + lora_B @ lora_A, dim=1))


def test_eval_output_follows_an_optimizer_step(tmp_path) -> None:
    """Train a step, then eval: the (cached) norm reflects the new A and B, as PEFT's recomputed one does."""
    reference = peft_model("seq")
    reference.save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path), is_trainable=True).eval()
    x = ids_for("seq")
    with torch.no_grad():
        ours(x)  # fills the cache
    for model in (reference, ours):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).square().sum().backward()
        optimizer.step()
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_mixed_batches_and_add_weighted_adapter_refuse_dora(tmp_path) -> None:
    peft_model("seq").save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path))
    ours.add_adapter("plain", peftlite.LoraConfig(r=4, **SEQ))
    with pytest.raises(ValueError, match="dora"):
        ours(ids_for("seq"), adapter_names=["default", "plain", "__base__"])
    with pytest.raises(ValueError, match="dora"):
        ours.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix")
    assert "mix" not in ours.peft_config


def test_hotswap_dora_takes_the_new_weights(tmp_path) -> None:
    peft_model("seq").save_pretrained(tmp_path / "a")
    other = peft_model("seq", init_lora_weights=True)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in other.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    other.save_pretrained(tmp_path / "b")
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path / "a")).eval()
    ours.hotswap_adapter(str(tmp_path / "b"), "default")
    x = ids_for("seq")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), other.eval()(x), rtol=1e-5, atol=1e-6)
    plain = peftlite.get_peft_model(Seq(), peftlite.LoraConfig(r=4, **SEQ))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="use_dora"):
        ours.hotswap_adapter(str(tmp_path / "plain"), "default")


@pytest.mark.parametrize("field", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_refused_on_a_fused_merged_linear(field: str) -> None:
    """PEFT has no enable_lora; a fused MergedLinear takes neither, and the failed call changes nothing."""
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="enable_lora|MergedLinear"):
        peftlite.get_peft_model(model, peftlite.LoraConfig(target_modules=["c_attn"], enable_lora=[True, False, True],
                                                           **{field: True}))
    assert not any("lora" in n for n in model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- lora_bias ---------------------------------------------------------------------------------------
BIAS_CASES = {"seq": (Seq, dict(target_modules=["lin", "c1d"])), "conv": (ConvNet, dict(target_modules=["conv"]))}


def peft_bias_model(case: str) -> peft.PeftModel:
    model_cls, fields = BIAS_CASES[case]
    model = peft.get_peft_model(model_cls(), peft.LoraConfig(r=4, lora_bias=True, init_lora_weights=False, **fields))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_()
    return model


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_lora_bias_both_ways_and_merge(case: str, tmp_path) -> None:
    model_cls, fields = BIAS_CASES[case]
    reference = peft_bias_model(case).eval()
    reference.save_pretrained(tmp_path / "peft")
    ours = peftlite.PeftModel.from_pretrained(model_cls(), str(tmp_path / "peft")).eval()
    x = ids_for(case)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
        ours.save_pretrained(tmp_path / "ours")
        assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
            load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        back = peft.PeftModel.from_pretrained(model_cls(), tmp_path / "ours").eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.state_dict(), reference.merge_and_unload().state_dict(),
                                   rtol=1e-5, atol=1e-6)


def test_lora_bias_trains_like_peft_and_mixes(tmp_path) -> None:
    peft_bias_model("seq").save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(Seq(), tmp_path, is_trainable=True)
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path), is_trainable=True)
    x = ids_for("seq")
    for model in (reference, ours):
        model(x).square().sum().backward()
    expected, got = lora_grads(reference), lora_grads(ours)
    assert set(got) == set(expected) and any(n.endswith("lora_B.default.bias") for n in got)
    for name in expected:
        assert_grad_close(got[name], expected[name], name)
    ours.eval()
    with torch.no_grad():  # a mixed batch runs each sample's adapter, bias included
        mixed = ours(x, adapter_names=["default", "__base__", "default"])
        torch.testing.assert_close(mixed[[0, 2]], ours(x)[[0, 2]], rtol=1e-5, atol=1e-6)
        with ours.disable_adapter():
            torch.testing.assert_close(mixed[1], ours(x)[1], rtol=1e-5, atol=1e-6)


def test_lora_bias_refusals() -> None:
    with pytest.raises(ValueError, match="lora_bias"):
        peftlite.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="lora_bias"):
        peftlite.LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="lora_bias"):
        peftlite.get_peft_model(Seq(), peftlite.LoraConfig(lora_bias=True, target_modules=["emb"]))
    model = peftlite.get_peft_model(ConvNet(), peftlite.LoraConfig(lora_bias=True, target_modules=["conv2"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no bias"):
        model.merge_adapter()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_add_weighted_adapter_refuses_lora_bias() -> None:
    model = peftlite.get_peft_model(Seq(), peftlite.LoraConfig(lora_bias=True, target_modules=["lin"]))
    model.add_adapter("other", peftlite.LoraConfig(target_modules=["lin"]))
    with pytest.raises(ValueError, match="lora_bias"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config


def test_state_dict_api_carries_the_magnitude() -> None:
    """PEFT's functional API: get_/set_peft_model_state_dict move DoRA magnitudes under PEFT's keys."""
    reference = peft_model("seq").eval()
    ours = peftlite.get_peft_model(Seq(), peftlite.LoraConfig(r=4, lora_alpha=8, use_dora=True, **SEQ)).eval()
    expected = peft.get_peft_model_state_dict(reference)
    assert set(peftlite.get_peft_model_state_dict(ours)) == set(expected)
    peftlite.set_peft_model_state_dict(ours, expected)
    x = ids_for("seq")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_eval_norm_is_computed_once_per_layer(case: str, tmp_path) -> None:
    """In eval the norm of every layer kind (views of W, A, B included) is cached and reused."""
    peft_model(case).save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(CASES[case][0](), str(tmp_path)).eval()
    layers = [layer for _, layer in ours.lora_layers()]
    variant = layers[0].adapters["default"].variant
    first = [variant.gain(layer, "default") for layer in layers]
    norms = [layer.lora_magnitude_vector["default"]._norm[1] for layer in layers]
    for layer, gain, norm in zip(layers, first, norms):
        torch.testing.assert_close(variant.gain(layer, "default"), gain)
        assert layer.lora_magnitude_vector["default"]._norm[1] is norm


def test_merging_dora_after_a_plain_adapter_unmerges_back_to_the_base(tmp_path) -> None:
    """The DoRA norm of a merge is the unmerged base's, as PEFT takes it; unmerging in reverse restores W."""
    peft_model("seq").save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(Seq(), str(tmp_path)).eval()
    ours.add_adapter("plain", peftlite.LoraConfig(r=2, init_lora_weights=False, **SEQ))
    base = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "base_layer" in k}
    ours.merge_adapter(["plain", "default"])
    lin = ours.base_model.model.lin
    expected_norm = torch.linalg.vector_norm(base["lin.base_layer.weight"] + lin.get_delta_weight("default"), dim=1)
    torch.testing.assert_close(lin.lora_magnitude_vector["default"].merged_norm, expected_norm)
    ours.unmerge_adapter()
    for name, tensor in base.items():
        torch.testing.assert_close(ours.get_base_model().state_dict()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
