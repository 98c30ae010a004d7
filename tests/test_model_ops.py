"""LoraModel operations on tiny models, against peft where it has the same operation.

Merging (merge/unmerge, merge_and_unload, unload, safe_merge, merge_weights),
several adapters (set/delete/disable), attribute forwarding, generate, and
short training runs that must lower the loss and touch only trainable weights.
The parity table and target selection live in test_model.py, whose helpers this uses.

Run: .venv/bin/pytest -q tests/test_model_ops.py
"""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from test_model import ATOL, CASES, ids_input, lora_paths, make_pair, run, trainable_names
from tiny_models import (
    LLAMA_TARGETS,
    MLP,
    copy_lora_to_peft,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from torch import nn

from peftlite import LoraConfig, LoraModel, get_lora_model
from peftlite.layers import LoraLayer, ModulesToSave

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
        layer.factors("default")[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="'default'.*NaN"):
        lite.merge_and_unload(safe_merge=True)
    assert lite.merged_adapters() == [] and lora_paths(lite.get_base_model(), LoraLayer)
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
            assert layer.merged_adapters == ["default"]
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
    with pytest.raises(ValueError, match="'missing'"):
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
    with pytest.raises(ValueError, match="'other'"):
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
    assert lite.get_base_model() is model
    assert lite.config is model.config and lite.generation_config is model.generation_config
    assert lite.device == model.device == torch.device("cpu")
    assert lite.get_input_embeddings() is model.get_input_embeddings()
    assert lite.transformer is model.transformer
    with pytest.raises(AttributeError, match="no_such_attribute"):
        lite.no_such_attribute  # noqa: B018


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
        assert biases == {f"base_model.model.{path}.base_layer.bias" for path, _ in lite.lora_layers()}
    else:  # every bias of the model, LayerNorms included
        assert biases == {f"base_model.model.{n}".replace(".c_attn.", ".c_attn.base_layer.")
                          for n, _ in factory().named_parameters() if n.endswith("bias")}
    ids = torch.tensor([[5, 9, 17] * 4] * 4)  # a repeating pattern a few steps can start to learn
    losses = train_steps(lite, lambda m: m(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, param in lite.get_base_model().named_parameters():
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
    for name, param in lite.get_base_model().named_parameters():
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
