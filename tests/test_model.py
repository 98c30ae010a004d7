"""LoraModel against the real `peft` on tiny models: same weights -> same outputs and parameter counts.

One table of (name, model, config) cases runs through the same checks (as PEFT's
test_custom_models does), then target selection against peft's. Merging,
switching, forwarding, generate and training are in test_model_ops.py.

Run: .venv/bin/pytest -q tests/test_model.py
"""

from __future__ import annotations

import copy
import warnings

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
    tiny_vit,
    token_batch,
)
from torch import nn

from peftlite import LoraConfig, get_lora_model
from peftlite.layers import LoraLayer, ModulesToSave

ATOL = 1e-5



def ids_input() -> dict:
    return {"input_ids": token_batch()}


def pixels_input() -> dict:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def mlp_input() -> tuple:
    return (torch.randn(4, 10, generator=torch.Generator().manual_seed(0)),)


def conv_input() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 16, (2, 5), generator=gen)


# (case id, model factory, LoraConfig kwargs (shared by peftlite and peft), inputs factory)
# peft has no default targets for ViT; where peftlite uses a default, peft is told the same names (PEFT_TARGETS).
CASES = [
    ("gpt2-conv1d", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"]), ids_input),
    ("gpt2-default-targets", tiny_gpt2, dict(r=4, lora_alpha=8), ids_input),
    ("gpt2-all-linear", tiny_gpt2, dict(r=2, lora_alpha=4, target_modules="all-linear"), ids_input),
    ("llama-7-targets-patterns", tiny_llama,
     dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\..*": 6},
          alpha_pattern={"down_proj": 3, "v_proj": 16}), ids_input),
    ("llama-rslora", tiny_llama, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True), ids_input),
    ("llama-layers-to-transform", tiny_llama,
     dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, layers_to_transform=[1]), ids_input),
    ("llama-default-targets", tiny_llama, dict(r=4, lora_alpha=8), ids_input),
    ("llama-embed-tokens", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), ids_input),
    ("llama-all-linear", tiny_llama, dict(r=2, lora_alpha=4, target_modules="all-linear"), ids_input),
    ("llama-exclude-list", tiny_llama,
     dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, exclude_modules=["model.layers.0.self_attn.q_proj", "down_proj"]),
     ids_input),
    ("llama-exclude-regex", tiny_llama,
     dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=r".*\.mlp\..*"), ids_input),
    ("llama-regex-target", tiny_llama,
     dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"), ids_input),
    ("gpt2-bias-all", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all"), ids_input),
    ("gpt2-bias-lora-only", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], bias="lora_only"),
     ids_input),
    ("bert-seq-cls", tiny_bert,
     dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
     ids_input),
    ("bert-default-targets-seq-cls", tiny_bert, dict(r=4, lora_alpha=8, task_type="SEQ_CLS"), ids_input),
    ("bert-all-linear-seq-cls", tiny_bert, dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS"),
     ids_input),
    ("bert-all-linear-no-task", tiny_bert, dict(r=2, lora_alpha=4, target_modules="all-linear"), ids_input),
    ("bert-bias-lora-only", tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="lora_only"),
     ids_input),
    ("bert-bias-all", tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"), ids_input),
    ("vit-query-value-patch-conv", tiny_vit,
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "projection"], modules_to_save=["classifier"]),
     pixels_input),
    ("vit-default-targets", tiny_vit, dict(r=4, lora_alpha=8), pixels_input),
    ("mlp", MLP, dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["head"]), mlp_input),
    ("mlp-all-linear", MLP, dict(r=4, lora_alpha=8, target_modules="all-linear"), mlp_input),
    ("convnet-embedding-conv2d", ConvNet, dict(r=3, lora_alpha=6, target_modules=["emb", "conv", "head"]), conv_input),
]


def run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def lora_paths(model: nn.Module, layer_type: type) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, layer_type)]


PEFT_TARGETS = {tiny_vit: ["q_proj", "v_proj"]}  # transformers 5 ViT names; peft has no ViT default


def trainable_names(model: nn.Module, peft_model: bool) -> set[str]:
    """Trainable parameter names, exactly as named_parameters gives them (PEFT's names in both libraries)."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def make_pair(factory, kwargs):
    """The same model twice: one wrapped by peftlite (random A and B), one by peft with the same weights."""
    lite = get_lora_model(factory(), LoraConfig(init_lora_weights=False, **copy.deepcopy(kwargs)))
    peft_kwargs = copy.deepcopy(kwargs)  # peft appends its SEQ_CLS heads to modules_to_save in place
    if "target_modules" not in kwargs and factory in PEFT_TARGETS:
        peft_kwargs["target_modules"] = PEFT_TARGETS[factory]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it sets fan_in_fan_out for Conv1D itself
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(init_lora_weights=False, **peft_kwargs))
    copy_lora_to_peft(lite, theirs)
    return lite, theirs


@pytest.mark.parametrize(("factory", "kwargs", "inputs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_weights_same_outputs_and_counts_as_peft(factory, kwargs, inputs):
    lite, theirs = make_pair(factory, kwargs)
    x = inputs()
    base_out = run(factory(), x)
    ours = run(lite, x)
    assert not torch.allclose(ours, base_out, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(ours, run(theirs, x), atol=ATOL, rtol=1e-5)
    assert lite.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(lite, False) == trainable_names(theirs, True)
    assert list(lite.state_dict()) == list(theirs.state_dict())  # same names, same order
    assert lora_paths(lite.get_base_model(), LoraLayer) == lora_paths(theirs.base_model.model, peft.tuners.lora.LoraLayer)
    assert lora_paths(lite.get_base_model(), ModulesToSave) == lora_paths(
        theirs.base_model.model, peft.utils.other.ModulesToSaveWrapper)
    with lite.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(run(lite, x), base_out)
        torch.testing.assert_close(run(theirs, x), base_out, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(("factory", "kwargs", "inputs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_default_init_gives_the_base_output(factory, kwargs, inputs):
    x = inputs()
    lite = get_lora_model(factory(), LoraConfig(**copy.deepcopy(kwargs)))
    torch.testing.assert_close(run(lite, x), run(factory(), x), atol=0, rtol=0)


def test_gpt2_conv1d_layers_are_fan_in_fan_out_without_changing_the_config():
    config = LoraConfig(target_modules=["c_attn"])
    lite = get_lora_model(tiny_gpt2(), config)
    assert all(layer.fan_in_fan_out for _, layer in lite.lora_layers())
    assert config.fan_in_fan_out is False and lite.peft_config["default"] is config


def test_llama_patterns_give_per_module_rank_and_scaling():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True, rank_pattern={"q_proj": 2},
                        alpha_pattern={"down_proj": 3})
    lite = get_lora_model(tiny_llama(), config)
    layers = dict(lite.lora_layers())
    q, down, v = (layers[f"model.layers.0.{p}"] for p in ("self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj"))
    # read through PEFT's per-layer names
    assert (q.r["default"], q.lora_A["default"].weight.shape[0]) == (2, 2)
    assert q.scaling["default"] == pytest.approx(8 / 2 ** 0.5)
    assert down.r["default"] == 4 and down.scaling["default"] == pytest.approx(3 / 2)
    assert v.r["default"] == 4 and v.scaling["default"] == pytest.approx(8 / 2)


def test_layers_to_transform_reads_the_first_numbered_segment():
    """As PEFT: `blocks.1.experts.0.w` is in layer 1, not layer 0."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            blocks = nn.ModuleList(
                nn.ModuleDict({"experts": nn.ModuleList(nn.ModuleDict({"w": nn.Linear(4, 4)}) for _ in range(2))})
                for _ in range(2))
            self.model = nn.ModuleDict({"blocks": blocks})

    kwargs = dict(target_modules=["w"], layers_to_transform=[1])
    ours = lora_paths(get_lora_model(Experts(), LoraConfig(**kwargs)).get_base_model(), LoraLayer)
    theirs = lora_paths(peft.get_peft_model(Experts(), peft.LoraConfig(**kwargs)).base_model.model,
                        peft.tuners.lora.LoraLayer)
    assert ours == theirs == ["model.blocks.1.experts.0.w", "model.blocks.1.experts.1.w"]


SELECTIONS = [
    dict(target_modules=["self_attn.q_proj"]),  # a dotted suffix
    dict(target_modules=["model.layers.0.mlp.up_proj", "v_proj"]),  # a full path beside a short name
    dict(target_modules=["embed_tokens", "q_proj"]),  # an embedding and a linear
    dict(target_modules=["lm_head"]),  # the head, when asked for by name
    dict(target_modules=r"model\.layers\.\d+\.self_attn\.[qk]_proj"),
    dict(target_modules=LLAMA_TARGETS, exclude_modules=["mlp.down_proj", "model.layers.1.self_attn.o_proj"]),
    dict(target_modules=LLAMA_TARGETS, exclude_modules=r".*\.1\..*"),
    dict(target_modules=LLAMA_TARGETS, layers_to_transform=0),
    dict(target_modules="all-linear", exclude_modules=["q_proj"]),
    dict(target_modules="all-linear", layers_to_transform=[1]),
]


@pytest.mark.parametrize("kwargs", SELECTIONS, ids=[str(i) for i in range(len(SELECTIONS))])
def test_target_selection_matches_peft(kwargs):
    ours = lora_paths(get_lora_model(tiny_llama(), LoraConfig(**copy.deepcopy(kwargs))).get_base_model(), LoraLayer)
    peft_kwargs = copy.deepcopy(kwargs)
    if peft_kwargs.get("target_modules") == "all-linear" and "layers_to_transform" in peft_kwargs:
        # peft refuses layers_to_transform with a string target; its "all-linear" expands to these names
        peft_kwargs["target_modules"] = LLAMA_TARGETS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**peft_kwargs))
    assert ours == lora_paths(theirs.base_model.model, peft.tuners.lora.LoraLayer)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_all_linear_leaves_the_output_head_alone(factory):
    lite = get_lora_model(factory(), LoraConfig(target_modules="all-linear"))
    paths = lora_paths(lite.get_base_model(), LoraLayer)
    assert "lm_head" not in paths and len(paths) > 2


def test_no_match_raises_value_error_listing_candidates_and_leaves_the_model_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        get_lora_model(model, LoraConfig(target_modules=["qkv_proj"]))
    message = str(info.value)
    assert "qkv_proj" in message and "q_proj" in message and "down_proj" in message
    assert not lora_paths(model, LoraLayer) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*candidate"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match=r"no default for model_type None.*candidate.*'lin0'"):
        get_lora_model(MLP(), LoraConfig())  # a plain module has no model_type default


def test_fused_qkv_with_enable_lora_leaves_the_disabled_slice_exact():
    """GPT-2's c_attn as a MergedLinear: q and v adapt, k's third of the output is the base output bit for bit."""
    x = ids_input()
    lite = get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], enable_lora=[True, False, True],
                                                  init_lora_weights=False))
    captured = {}
    layer = lite.base_model.transformer.h[0].attn.c_attn
    layer.register_forward_hook(lambda module, args, out: captured.update(x=args[0], out=out))
    lora_out = run(lite, x)
    d = lite.config.n_embd
    base_out = layer.base_layer(captured["x"])
    assert torch.equal(captured["out"][..., d:2 * d], base_out[..., d:2 * d])
    assert not torch.allclose(captured["out"][..., :d], base_out[..., :d])
    assert not torch.allclose(captured["out"][..., 2 * d:], base_out[..., 2 * d:])
    merged = lite.merge_and_unload()
    torch.testing.assert_close(run(merged, x), lora_out, atol=ATOL, rtol=1e-5)
