"""add_weighted_adapter against PEFT 0.21 on the same adapters, and against Σ w·ΔW written out.

Run: .venv/bin/pytest -x -q tests/test_combine.py
"""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import (
    LLAMA_TARGETS,
    MLP,
    ConvNet,
    copy_lora_to_peft,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)

from peftlite import LoraConfig, get_lora_model


def token_inputs() -> tuple[torch.Tensor, ...]:
    return (token_batch(3, 8),)


def convnet_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 4, 4, generator=generator), torch.randint(0, 16, (3, 5), generator=generator)


def output(model, inputs):
    out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def both_models(factory, configs: dict[str, dict]):
    """The same random adapters in peftlite and in PEFT (names avoid PEFT's 'lora_' substring warning)."""
    lite = reference = None
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        if lite is None:
            lite = get_lora_model(factory(), LoraConfig(init_lora_weights=False, **config), adapter_name=name)
            reference = peft.get_peft_model(factory(), peft.LoraConfig(**config), adapter_name=name)
        else:
            lite.add_adapter(name, LoraConfig(init_lora_weights=False, **config))
            reference.add_adapter(name, peft.LoraConfig(**config))
        copy_lora_to_peft(lite, reference, name)
    return lite.eval(), reference.eval()


SAME_RANK = {name: dict(r=4, lora_alpha=alpha, target_modules=targets) for name, alpha, targets in [
    ("p1", 8, LLAMA_TARGETS), ("p2", 16, ["q_proj", "v_proj", "down_proj"]), ("p3", 2, ["q_proj"])]}
RANKS_DIFFER = {"p1": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
                "p2": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                "p3": dict(r=2, lora_alpha=6, target_modules=["up_proj", "q_proj"])}
CASES = {  # name -> (factory, adapters, inputs, [(combination_type, weights, svd_rank)])
    "llama-same-rank": (tiny_llama, SAME_RANK, token_inputs,
                        [("linear", [0.7, -0.4, 1.5], None), ("cat", [0.7, -0.4, 1.5], None),
                         ("svd", [0.7, -0.4, 1.5], None), ("svd", [1.0, 0.5, 0.25], 3)]),
    "llama-ranks-differ": (tiny_llama, RANKS_DIFFER, token_inputs,
                           [("cat", [1.0, 0.3, -2.0], None), ("svd", [1.0, 0.3, -2.0], 6)]),
    "gpt2-conv1d": (tiny_gpt2, {"p1": dict(r=4, target_modules=["c_attn", "c_fc"]),
                                "p2": dict(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj"])}, token_inputs,
                    [("linear", [0.5, 0.5], None), ("cat", [2.0, -1.0], None), ("svd", [2.0, -1.0], 4)]),
    "embedding-conv2d": (ConvNet, {"p1": dict(r=3, target_modules=["emb", "conv", "head"]),
                                   "p2": dict(r=3, lora_alpha=6, target_modules=["emb", "conv"])}, convnet_inputs,
                         [("linear", [1.0, 0.5], None), ("cat", [1.0, -0.5], None), ("svd", [1.0, -0.5], 2)]),
}


@pytest.mark.parametrize("case", CASES)
def test_same_outputs_as_peft(case):
    factory, configs, make_inputs, requests = CASES[case]
    lite, reference = both_models(factory, configs)
    names = list(configs)
    inputs = make_inputs()
    for index, (combination_type, weights, svd_rank) in enumerate(requests):
        new = f"mix{index}"
        lite.add_weighted_adapter(names, weights, new, combination_type=combination_type, svd_rank=svd_rank)
        reference.add_weighted_adapter(names, weights, new, combination_type=combination_type, svd_rank=svd_rank)
        lite.set_adapter(new)
        reference.set_adapter(new)
        with torch.no_grad():
            expected = output(reference, inputs)
            torch.testing.assert_close(output(lite, inputs), expected, atol=1e-5, rtol=1e-4,
                                       msg=f"{combination_type} {weights} svd_rank={svd_rank}")
            with lite.disable_adapter():
                assert not torch.allclose(output(lite, inputs), expected, atol=1e-3)
        assert lite.peft_config[new].r == reference.peft_config[new].r


def delta_weights(model, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name) for path, layer in model.lora_layers()
            if name in layer.adapters}


def test_merged_linear_cat_and_full_rank_svd_are_the_weighted_sum_of_deltas():
    """MergedLinear (loralib's fused QKV, not in PEFT): ΔW_new = Σ w_i ΔW_i, written out."""
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora=[True, False, True],
                                                   init_lora_weights=False), adapter_name="p1")
    model.add_adapter("p2", LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], enable_lora=[True, False, True],
                                       use_rslora=True, init_lora_weights=False))
    weights = [0.8, -1.3]
    sources = [delta_weights(model, name) for name in ("p1", "p2")]
    model.add_weighted_adapter(["p1", "p2"], weights, "cat", combination_type="cat")
    model.add_weighted_adapter(["p1", "p2"], weights, "svd", combination_type="svd", svd_rank=5)
    for new in ("cat", "svd"):
        combined = delta_weights(model, new)
        assert set(combined) == set(sources[0])
        for path, delta in combined.items():
            expected = weights[0] * sources[0][path] + weights[1] * sources[1][path]
            torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
        layer = model.get_base_model().get_submodule(next(iter(combined)))
        assert layer.adapters[new].scaling == 1.0  # not √r: use_rslora does not carry over
        assert not model.peft_config[new].use_rslora


def test_linear_is_the_sqrt_weighted_sum_of_A_and_B():
    model = get_lora_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights=False),
                           adapter_name="p1")
    model.add_adapter("p2", LoraConfig(r=2, lora_alpha=1, target_modules=["lin0"], init_lora_weights=False))
    model.add_weighted_adapter(["p1", "p2"], [3.0, -0.5], "mix")
    layer = model.base_model.lin0
    (A1, B1), (A2, B2), (mix_A, mix_B) = (layer.factors(n) for n in ("p1", "p2", "mix"))
    w1, w2 = 3.0 * layer.scaling["p1"], -0.5 * layer.scaling["p2"]  # 6.0 and -0.25
    torch.testing.assert_close(mix_A, w1 ** 0.5 * A1 - abs(w2) ** 0.5 * A2)
    torch.testing.assert_close(mix_B, w1 ** 0.5 * B1 + abs(w2) ** 0.5 * B2)


def test_new_adapter_is_frozen_inactive_and_covers_the_union_of_layers():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, **{"target_modules": ["q_proj"]}), adapter_name="p1")
    model.add_adapter("p2", LoraConfig(r=4, target_modules=["v_proj"]))
    model.add_weighted_adapter(["p1", "p2"], [1.0, 1.0], "mix")
    assert model.active_adapter == "p1"
    paths = {path for path, layer in model.lora_layers() if "mix" in layer.adapters}
    assert paths == {path for path, layer in model.lora_layers() if {"p1", "p2"} & set(layer.adapters)}
    assert not any(p.requires_grad for _, layer in model.lora_layers() for p in layer.adapter_parameters("mix"))


def test_a_module_saved_by_one_source_is_copied_from_it():
    model = get_lora_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                                   init_lora_weights=False), adapter_name="p1")
    model.add_adapter("p2", LoraConfig(r=2, target_modules=["value"], init_lora_weights=False))
    head = model.base_model.classifier
    with torch.no_grad():
        head.modules_to_save["p1"].weight.add_(1.0)
    model.add_weighted_adapter(["p2", "p1"], [1.0, 1.0], "mix", combination_type="cat")
    assert torch.equal(head.modules_to_save["mix"].weight, head.modules_to_save["p1"].weight)
    assert model.peft_config["mix"].modules_to_save == ["classifier"]


def _two_adapter_mlp():
    model = get_lora_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False),
                           adapter_name="p1")
    model.add_adapter("p2", LoraConfig(r=4, target_modules=["lin1"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("call,error,words", [
    (lambda m: m.add_weighted_adapter(["p1", "nope"], [1, 1], "mix"), ValueError, ["'nope'", "unknown adapter"]),
    (lambda m: m.add_weighted_adapter(["p1", "p2"], [1, 1], "mix"), ValueError, ["linear", "equal ranks"]),
    (lambda m: m.add_weighted_adapter(["p1", "p2"], [1], "mix", "cat"), ValueError, ["weights=[1]", "2 finite"]),
    (lambda m: m.add_weighted_adapter(["p1", "p2"], [1, float("nan")], "mix", "cat"), ValueError, ["weights="]),
    (lambda m: m.add_weighted_adapter(["p1", "p2"], [1, 1], "mix", "ties"), ValueError, ["'ties'", "'svd'"]),
    (lambda m: m.add_weighted_adapter(["p1", "p2"], [1, 1], "mix", "svd", 0), ValueError, ["svd_rank=0"]),
    (lambda m: m.add_weighted_adapter([], [], "mix"), ValueError, ["adapters=[]"]),
    (lambda m: m.add_weighted_adapter("p1", [1], "mix"), ValueError, ["adapters='p1'"]),
    (lambda m: m.add_weighted_adapter(["p1"], [1], "p2"), ValueError, ["'p2'", "already exists"]),
    (lambda m: m.add_weighted_adapter(["p1"], [1], "bad name"), ValueError, ["'bad name'"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_requests_raise_and_change_nothing(call, error, words):
    model = _two_adapter_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        call(model)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert set(model.peft_config) == {"p1", "p2"}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_one_adapter_is_linear_and_scales_it():
    model = _two_adapter_mlp()
    model.add_weighted_adapter(["p2"], [-2.0], "neg", combination_type="svd", svd_rank=1)
    assert model.peft_config["neg"].r == 4  # "linear" kept p2's rank; svd_rank is ignored as in PEFT
    layer = model.base_model.lin1
    torch.testing.assert_close(layer.delta_weight("neg"), -2.0 * layer.delta_weight("p2"))
