"""LoraModel against the real `peft` on tiny models: same weights -> same outputs and parameter counts.

One table of (name, model, config) cases runs through the same checks (as PEFT's
test_custom_models does); the rest are the model-level behaviours: merging,
adapter switching, attribute forwarding, generate, and a short training run.

Run: .venv/bin/pytest -q tests/test_model.py
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import peft
import pytest
import torch
from torch import nn

from peftlite import LoraConfig, LoraModel, get_lora_model
from peftlite.layers import LoraLayer, ModulesToSave
from tiny_models import (LLAMA_TARGETS, MLP, ConvNet, copy_lora_to_peft, one_torch_thread, tiny_bert, tiny_gpt2,
                         tiny_llama, tiny_vit, token_batch)

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: torch's thread pool only adds waiting on a shared 2-core machine."""
    with one_torch_thread():
        yield


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
    """Trainable parameter names with each library's wrapper parts taken out, so the two can be compared."""
    drop = {"adapters", "default", "weight"}
    names = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model." if peft_model else "base_model.")
            name = name.replace("lora_embedding_", "lora_")
            names.add(".".join(part for part in name.split(".") if part not in drop))
    return names


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
    assert lora_paths(lite.base_model, LoraLayer) == lora_paths(theirs.base_model.model, peft.tuners.lora.LoraLayer)
    assert lora_paths(lite.base_model, ModulesToSave) == lora_paths(
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
    q, down, v = (layers[f"model.layers.0.{p}"].adapters["default"] for p in
                  ("self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj"))
    assert (q.r, q.lora_A.shape[0]) == (2, 2) and q.scaling == pytest.approx(8 / 2 ** 0.5)
    assert down.r == 4 and down.scaling == pytest.approx(3 / 2)
    assert v.r == 4 and v.scaling == pytest.approx(8 / 2)


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
    ours = lora_paths(get_lora_model(Experts(), LoraConfig(**kwargs)).base_model, LoraLayer)
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
    ours = lora_paths(get_lora_model(tiny_llama(), LoraConfig(**copy.deepcopy(kwargs))).base_model, LoraLayer)
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
    paths = lora_paths(lite.base_model, LoraLayer)
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


# ---- merging -------------------------------------------------------------------
MERGE_CASES = [c for c in CASES if c[0] in ("gpt2-conv1d", "llama-7-targets-patterns", "bert-seq-cls",
                                            "vit-query-value-patch-conv", "convnet-embedding-conv2d")]


@pytest.mark.parametrize(("factory", "kwargs", "inputs"), [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES])
def test_merge_unmerge_merge_and_unload_unload(factory, kwargs, inputs):
    x = inputs()
    base = factory()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    # unload of a never-merged model: the base model as it was, bit for bit, with no LoRA module left.
    lite, _ = make_pair(factory, kwargs)
    lora_out = run(lite, x)
    unloaded = lite.unload()
    assert not lora_paths(unloaded, LoraLayer) and not lora_paths(unloaded, ModulesToSave)
    assert unloaded.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in unloaded.state_dict().items())
    assert torch.equal(run(unloaded, x), run(base, x))

    # merge and unmerge: same outputs; unmerging restores the weights up to float rounding.
    lite, _ = make_pair(factory, kwargs)
    lite.merge_adapter()
    assert lite.merged_adapters() == ["default"]
    torch.testing.assert_close(run(lite, x), lora_out, atol=ATOL, rtol=1e-5)
    lite.unmerge_adapter()
    assert lite.merged_adapters() == []
    torch.testing.assert_close(run(lite, x), lora_out, atol=ATOL, rtol=1e-5)
    for key, value in lite.unload().state_dict().items():
        torch.testing.assert_close(value, base_state[key], atol=1e-6, rtol=0)

    # merge_and_unload: a plain model whose output is the adapter's, as peft's is.
    lite, theirs = make_pair(factory, kwargs)
    merged = lite.merge_and_unload()
    assert not lora_paths(merged, LoraLayer) and not lora_paths(merged, ModulesToSave)
    assert merged.state_dict().keys() == base_state.keys()
    torch.testing.assert_close(run(merged, x), lora_out, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(run(merged, x), run(theirs.merge_and_unload(), x), atol=ATOL, rtol=1e-5)


def test_unload_after_merge_restores_the_weights():
    x = ids_input()
    base_state = tiny_llama().state_dict()
    lite, _ = make_pair(tiny_llama, dict(target_modules=LLAMA_TARGETS))
    lite.merge_adapter()
    unloaded = lite.unload()
    for key, value in unloaded.state_dict().items():
        torch.testing.assert_close(value, base_state[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(unloaded, x), run(tiny_llama(), x), atol=ATOL, rtol=1e-5)


def test_safe_merge_refuses_non_finite_weights_and_merges_nothing():
    lite, _ = make_pair(tiny_llama, dict(target_modules=["q_proj", "v_proj"]))
    weights = {k: v.clone() for k, v in lite.state_dict().items()}
    layer = dict(lite.lora_layers())["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        layer.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'default'.*NaN"):
        lite.merge_and_unload(safe_merge=True)
    assert lite.merged_adapters() == [] and lora_paths(lite.base_model, LoraLayer)
    for key, value in lite.state_dict().items():
        if "lora_B" not in key:
            assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("factory,target", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_weights_eval_merges_train_unmerges(factory, target):
    x = ids_input()
    model = factory()
    for module in model.modules():  # the model's own dropout would make train-mode outputs random
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    lite = get_lora_model(model, LoraConfig(target_modules=target, merge_weights=True, init_lora_weights=False))
    lite.train()
    assert lite.merged_adapters() == []
    train_out = run(lite, x)
    lite.eval()
    assert lite.merged_adapters() == ["default"]
    eval_out = run(lite, x)
    torch.testing.assert_close(eval_out, train_out, atol=ATOL, rtol=1e-5)
    # With the adapter merged, the base layers alone produce the adapted output.
    with torch.no_grad():
        for _, layer in lite.lora_layers():
            assert layer.merged == ["default"]
    lite.train()
    assert lite.merged_adapters() == []
    torch.testing.assert_close(run(lite, x), train_out, atol=ATOL, rtol=1e-5)


# ---- several adapters --------------------------------------------------------
def two_adapter_pair():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lite = get_lora_model(tiny_llama(), LoraConfig(**kwargs))
    lite.add_adapter("other", LoraConfig(**{**kwargs, "target_modules": ["k_proj", "o_proj"], "r": 2}))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    theirs.add_adapter("other", peft.LoraConfig(**{**kwargs, "target_modules": ["k_proj", "o_proj"], "r": 2}))
    copy_lora_to_peft(lite, theirs, "default")
    copy_lora_to_peft(lite, theirs, "other")
    return lite, theirs


def test_set_adapter_switches_like_peft():
    x = ids_input()
    lite, theirs = two_adapter_pair()
    assert lite.active_adapter == "default"
    default_out = run(lite, x)
    torch.testing.assert_close(default_out, run(theirs, x), atol=ATOL, rtol=1e-5)
    lite.set_adapter("other")
    theirs.set_adapter("other")
    assert lite.active_adapter == "other"
    other_out = run(lite, x)
    assert not torch.allclose(other_out, default_out, atol=1e-3)
    torch.testing.assert_close(other_out, run(theirs, x), atol=ATOL, rtol=1e-5)
    # Unlike PEFT, set_adapter is O(1) and flips no requires_grad: each adapter stays as its config made it.
    lora_params = sum(p.numel() for n, p in lite.named_parameters() if ".lora_" in n)
    assert lite.get_nb_trainable_parameters()[0] == lora_params
    with pytest.raises(KeyError, match="'missing'"):
        lite.set_adapter("missing")
    assert lite.active_adapter == "other"


def test_delete_adapter_removes_its_parameters():
    x = ids_input()
    lite, theirs = two_adapter_pair()
    lite.delete_adapter("other")
    theirs.delete_adapter("other")
    assert list(lite.peft_config) == ["default"] and lite.active_adapter == "default"
    assert not any("other" in name for name, _ in lite.named_parameters())
    assert lite.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(run(lite, x), run(theirs, x), atol=ATOL, rtol=1e-5)
    with pytest.raises(KeyError, match="'other'"):
        lite.delete_adapter("other")


def test_disable_adapter_gives_the_base_output_and_restores_merges():
    x = ids_input()
    lite, _ = two_adapter_pair()
    base_out, lora_out = run(tiny_llama(), x), run(lite, x)
    lite.merge_adapter()
    with lite.disable_adapter():
        torch.testing.assert_close(run(lite, x), base_out, atol=ATOL, rtol=1e-5)
    assert lite.merged_adapters() == ["default"]
    torch.testing.assert_close(run(lite, x), lora_out, atol=ATOL, rtol=1e-5)


# ---- forwarding and generate --------------------------------------------------
def test_getattr_forwards_to_the_wrapped_model():
    model = tiny_gpt2()
    lite = get_lora_model(model, LoraConfig(target_modules=["c_attn"]))
    assert lite.base_model is model
    assert lite.config is model.config and lite.generation_config is model.generation_config
    assert lite.device == model.device == torch.device("cpu")
    assert lite.get_input_embeddings() is model.get_input_embeddings()
    assert lite.transformer is model.transformer
    with pytest.raises(AttributeError, match="no_such_attribute"):
        lite.no_such_attribute


def test_generate_matches_peft_and_the_base_when_disabled():
    lite, theirs = make_pair(tiny_gpt2, dict(r=4, lora_alpha=32, target_modules=["c_attn", "c_proj"]))
    prompt = token_batch(batch=2, length=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    ours = lite.generate(input_ids=prompt, **kwargs)
    assert ours.shape == (2, 10) and torch.equal(ours[:, :4], prompt)
    assert torch.equal(ours, theirs.generate(input_ids=prompt, **kwargs))
    with lite.disable_adapter():
        assert torch.equal(lite.generate(input_ids=prompt, **kwargs), tiny_gpt2().generate(input_ids=prompt, **kwargs))


def test_print_trainable_parameters(capsys):
    lite, theirs = make_pair(tiny_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS"))
    lite.print_trainable_parameters()
    ours = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert ours == capsys.readouterr().out


# ---- training ------------------------------------------------------------------
def train_steps(model: nn.Module, loss_fn, steps: int = 8, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("factory", "targets", "bias"), [(tiny_llama, LLAMA_TARGETS, "none"),
                                                         (tiny_gpt2, ["c_attn", "c_fc"], "lora_only"),
                                                         (tiny_gpt2, ["c_attn"], "all")])
def test_training_lowers_the_loss_and_only_touches_trainable_weights(factory, targets, bias):
    model = factory()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    lite = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias=bias,
                                            lora_dropout=0.1, task_type="CAUSAL_LM"))
    trainable = {name for name, p in lite.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n or n.endswith("bias") for n in trainable)
    biases = {n for n in trainable if n.endswith("bias")}
    if bias == "none":
        assert not biases
    elif bias == "lora_only":  # exactly the biases of the wrapped layers
        assert biases == {f"base_model.{path}.base_layer.bias" for path, _ in lite.lora_layers()}
    else:  # every bias of the model, LayerNorms included
        assert biases == {f"base_model.{n}".replace(".c_attn.", ".c_attn.base_layer.")
                          for n, _ in factory().named_parameters() if n.endswith("bias")}
    ids = torch.tensor([[5, 9, 17] * 4] * 4)  # a repeating pattern a few steps can start to learn
    losses = train_steps(lite, lambda m: m(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, param in lite.base_model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in frozen and not param.requires_grad:
            assert torch.equal(param, frozen[original]), name


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bert_training_trains_lora_head_copy_and_chosen_biases(bias):
    model = tiny_bert(num_labels=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias, task_type="SEQ_CLS")
    lite = get_lora_model(model, LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_bert(num_labels=2), peft.LoraConfig(**kwargs))
    assert trainable_names(lite, False) == trainable_names(theirs, True)
    ids, labels = token_batch(batch=8, length=10), torch.arange(8) % 2
    losses = train_steps(lite, lambda m: m(input_ids=ids, labels=labels).loss, steps=10)
    assert losses[-1] < losses[0]
    for name, param in lite.base_model.named_parameters():
        original = name.replace(".base_layer", "").replace(".original_module", "")
        if ".modules_to_save." in name:
            assert not torch.equal(param, frozen[original.replace(".modules_to_save.default", "")]), name
        elif not param.requires_grad:
            assert torch.equal(param, frozen[original]), name
        elif name.endswith("bias"):
            assert not torch.equal(param, frozen[original]), name


def test_inference_mode_and_loaded_adapter_config_train_nothing():
    lite = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert lite.get_nb_trainable_parameters()[0] == 0
    config = dataclasses.replace(LoraConfig(target_modules=["q_proj"]), inference_mode=False)
    assert get_lora_model(tiny_llama(), config).get_nb_trainable_parameters()[0] > 0


def test_lora_model_is_the_public_class():
    lite = get_lora_model(MLP(), LoraConfig(target_modules=["lin0"]))
    assert isinstance(lite, LoraModel) and isinstance(lite, nn.Module)
    assert lite.peft_config["default"].target_modules == ["lin0"]
