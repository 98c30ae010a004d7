"""trainable_token_indices against the real `peft` 0.21.2: names, outputs, gradients, files, merging, errors.

Tiny Llama with untied and tied embeddings and GPT-2 (tied lm_head). Each case gives both
libraries the same token rows (and LoRA factors) by parameter name, which the two share.

    .venv/bin/pytest -x -q tests/test_trainable_tokens.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft import get_peft_model_state_dict as peft_state_dict
from safetensors.torch import load_file, save_file
from tiny_models import assert_same_fingerprint, model_fingerprint, tiny_gpt2, tiny_llama, token_batch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from peftlite import (
    LoraConfig,
    LoraModel,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

warnings.filterwarnings("ignore", category=FutureWarning)
IDS = [3, 5, 7, 60]


def tiny_llama_tied(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_gemma(seed: int = 0) -> GemmaForCausalLM:
    """Gemma's input embedding scales its rows by sqrt(hidden) in its own forward (embed_scale); tied lm_head."""
    torch.manual_seed(seed)
    config = GemmaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64,
                         pad_token_id=1)
    return GemmaForCausalLM(config).eval()


# arch -> (factory, LoRA targets, embedding path, tied output path or None)
ARCHS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"], "model.embed_tokens", None),
    "llama_tied": (tiny_llama_tied, ["q_proj", "v_proj"], "model.embed_tokens", "lm_head"),
    "gpt2": (tiny_gpt2, ["c_attn"], "transformer.wte", "lm_head"),
    "gemma": (tiny_gemma, ["q_proj", "v_proj"], "model.embed_tokens", "lm_head"),
}


def fields(arch: str, indices=None, lora: str = "zero", **extra) -> dict:
    """A config for both libraries; lora="random" also makes the LoRA factors change the output."""
    return {"target_modules": ARCHS[arch][1], "trainable_token_indices": IDS if indices is None else indices,
            "init_lora_weights": lora != "random", **extra}


def inputs(seed: int = 0) -> torch.Tensor:
    tokens = token_batch(seed=seed)
    tokens[tokens == IDS[3]] += 1  # the last chosen row is never looked up (only a tied lm_head uses it)
    tokens[:, :3] = torch.tensor(IDS[:3])  # the other chosen rows are
    return tokens


def logits(model, tokens: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs() if tokens is None else tokens, **kwargs).logits


def randomize(ours, reference, seed: int = 1) -> None:
    """New values for every trainable parameter of ours (token rows, LoRA), copied into PEFT's by name."""
    theirs = dict(reference.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
                theirs[name].copy_(param)


def pair(arch: str, **kwargs) -> tuple:
    """(PEFT model, peftlite model) of the same base, with the same random rows and LoRA factors."""
    config = fields(arch, **kwargs)
    reference = peft_get_peft_model(ARCHS[arch][0](), PeftLoraConfig(**config))
    ours = get_peft_model(ARCHS[arch][0](), LoraConfig(**config))
    randomize(ours, reference)
    return reference, ours


def train_without_dropout(model) -> None:
    """Training mode with GPT-2's dropout off, so both libraries see the same function."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


# ---- names and keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_trainable_names_and_file_keys_equal_peft(arch):
    reference, ours = pair(arch)
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert trainable_names(ours) == trainable_names(reference)
    embedding, tied = ARCHS[arch][2], ARCHS[arch][3]
    row_key = f"base_model.model.{embedding}.token_adapter.trainable_tokens_delta"
    assert f"{row_key}.default" in trainable_names(ours)
    ours_file, theirs_file = get_peft_model_state_dict(ours), peft_state_dict(reference)
    assert ours_file.keys() == theirs_file.keys() and row_key in ours_file
    assert ours_file[row_key].shape == (len(IDS), 32)
    if tied:  # a tied output layer shares the embedding's rows: one parameter, no key of its own
        wrapper = ours.base_model.model.get_submodule(tied)
        assert wrapper.token_adapter.trainable_tokens_delta is \
            ours.base_model.model.get_submodule(embedding).token_adapter.trainable_tokens_delta
        assert not any(k.startswith(f"base_model.model.{tied}.") for k in ours_file)


# ---- outputs and gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("lora", ["zero", "random"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_outputs_match_peft(arch, lora):
    reference, ours = pair(arch, lora=lora)
    expected = logits(reference)
    assert not torch.allclose(expected, logits(ARCHS[arch][0]()), atol=1e-3)  # the rows change the output
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_adapter_gives_the_base_output(arch):
    ours = get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch)))
    torch.testing.assert_close(logits(ours), logits(ARCHS[arch][0]()), atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_only_on_chosen_rows_and_equal_peft(arch):
    reference, ours = pair(arch, lora="random")
    grads = []
    for model in (reference, ours):
        train_without_dropout(model)
        tokens = inputs(seed=3)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    embedding = ARCHS[arch][2]
    rows = grads[1][f"base_model.model.{embedding}.token_adapter.trainable_tokens_delta.default"]
    assert rows.shape == (len(IDS), 32) and bool((rows[:3].abs().sum(dim=1) > 0).all())
    assert bool(rows[3].abs().sum() > 0) == (ARCHS[arch][3] is not None)  # a tied head trains every chosen row
    # The full embedding table itself takes no gradient: only the chosen rows train.
    table = dict(ours.named_parameters())[f"base_model.model.{embedding}.token_adapter.base_layer.weight"]
    assert not table.requires_grad and table.grad is None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_changes_only_the_chosen_rows(arch):
    ours = get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch)))
    base = ARCHS[arch][0]()
    wrapper = ours.base_model.model.get_submodule(ARCHS[arch][2])
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    ours.train()
    for step in range(3):
        tokens = inputs(seed=step)
        ours(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    original = base.get_input_embeddings().weight
    changed = (wrapper.weight.detach() != original).any(dim=1).nonzero().flatten().tolist()
    # The looked-up rows moved, and row 60 (never looked up) only through a tied lm_head; no other row did.
    assert changed == (IDS if ARCHS[arch][3] else IDS[:3])
    assert torch.equal(wrapper.original_module.weight, original)  # the table is untouched until a merge
    if ARCHS[arch][3]:
        head = ours.base_model.model.get_submodule(ARCHS[arch][3])
        torch.testing.assert_close(head.weight, wrapper.weight, atol=0, rtol=0)


# ---- files both ways ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", ["zero", "random"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_in_peftlite_loads_in_peft_and_back(tmp_path, arch, lora):
    reference, ours = pair(arch, lora=lora)
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == peft_state_dict(reference).keys()
    loaded_in_peft = PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_in_peft), expected, atol=1e-5, rtol=1e-4)
    loaded_in_peft.save_pretrained(tmp_path / "theirs")
    back = LoraModel.from_pretrained(ARCHS[arch][0](), tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(logits(back), expected, atol=1e-5, rtol=1e-4)
    assert trainable_names(back) == trainable_names(ours)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_by_peft_loads_in_peftlite(tmp_path, arch):
    reference, _ = pair(arch, lora="random")
    reference.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(ARCHS[arch][0](), tmp_path)
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=1e-4)
    assert not trainable_names(ours)  # is_trainable=False: rows frozen too


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_functional_state_dicts_and_hotswap_carry_the_rows(tmp_path, arch):
    reference, _ = pair(arch, lora="random")
    expected = logits(reference)
    ours = get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch)))
    set_peft_model_state_dict(ours, peft_state_dict(reference))
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    # The base model's own tensors, under their original names: no token rows among them.
    assert get_base_model_state_dict(ours).keys() == ARCHS[arch][0]().state_dict().keys()
    reference.save_pretrained(tmp_path)
    fresh = get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch)))
    fresh.hotswap_adapter(tmp_path, adapter_name="default")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=1e-4)
    for indices in ([3, 5], [9, 8, 7, 6]):  # other token ids (even as many): neither takes the file's rows
        other = get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch, indices=indices)))
        before = model_fingerprint(other)
        with pytest.raises(ValueError, match="trainable_token"):
            other.hotswap_adapter(tmp_path, adapter_name="default")
        assert_same_fingerprint(before, model_fingerprint(other))
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), expected \(2, 32\)"):
        set_peft_model_state_dict(get_peft_model(ARCHS[arch][0](), LoraConfig(**fields(arch, indices=[3, 5]))),
                                  peft_state_dict(reference))


# ---- merging and unloading ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_and_unload_equals_peft(arch):
    reference, ours = pair(arch, lora="random")
    expected = logits(ours)
    theirs, mine = reference.merge_and_unload(), ours.merge_and_unload()
    assert [(n, type(m)) for n, m in mine.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(logits(mine), expected, atol=1e-5, rtol=1e-4)
    tied = ARCHS[arch][3]
    assert (mine.get_output_embeddings().weight is mine.get_input_embeddings().weight) == bool(tied)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_unmerge_and_unload_restore_the_rows(arch):
    _, ours = pair(arch)
    expected = logits(ours)
    base = ARCHS[arch][0]()
    ours.merge_adapter()
    embedding = ours.base_model.model.get_submodule(ARCHS[arch][2]).original_module.weight
    assert not torch.equal(embedding, base.get_input_embeddings().weight)  # rows written in
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(base), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-4)
    ours.unmerge_adapter()
    assert torch.equal(embedding, base.get_input_embeddings().weight)
    plain = ours.unload()
    assert type(plain.get_input_embeddings()) is type(base.get_input_embeddings())
    torch.testing.assert_close(logits(plain), logits(base), atol=0, rtol=0)


def test_safe_merge_refuses_non_finite_rows_and_changes_nothing():
    _, ours = pair("llama")
    with torch.no_grad():
        ours.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"][1, 0] = float("nan")
    before = model_fingerprint(ours)
    for merge in (lambda: ours.merge_adapter(safe_merge=True), lambda: ours.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            merge()
        assert_same_fingerprint(before, model_fingerprint(ours))


# ---- several adapters -------------------------------------------------------------------------------------
def test_several_adapters_switch_disable_and_delete_as_peft():
    config = {"target_modules": ["q_proj"], "init_lora_weights": False}
    reference = peft_get_peft_model(tiny_llama_tied(), PeftLoraConfig(**config, trainable_token_indices=[3, 5]))
    ours = get_peft_model(tiny_llama_tied(), LoraConfig(**config, trainable_token_indices=[3, 5]))
    reference.add_adapter("other", PeftLoraConfig(**config, trainable_token_indices=[5, 7, 9]))
    ours.add_adapter("other", LoraConfig(**config, trainable_token_indices=[5, 7, 9]))
    assert set(ours.state_dict()) == set(reference.state_dict())
    randomize(ours, reference)
    for name in ("other", "default"):
        reference.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=1e-4, msg=name)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(tiny_llama_tied()), atol=1e-5, rtol=1e-4)
    before = model_fingerprint(ours)
    with pytest.raises(ValueError, match="only one of them"):  # PEFT: one adapter with tokens per layer at a time
        ours.base_model.set_adapter(["default", "other"])
    assert_same_fingerprint(before, model_fingerprint(ours))
    ours.delete_adapter("other")
    reference.delete_adapter("other")
    assert set(ours.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=1e-4)


def test_second_adapter_loaded_from_a_peft_file(tmp_path):
    reference, ours = pair("gpt2", lora="random")
    reference.save_pretrained(tmp_path)
    expected = logits(reference)
    fresh = get_peft_model(tiny_gpt2(), LoraConfig(**fields("gpt2", indices=[9])))
    fresh.load_adapter(tmp_path, adapter_name="loaded")
    fresh.set_adapter("loaded")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=1e-4)
    fresh.set_adapter("default")
    torch.testing.assert_close(logits(fresh), logits(tiny_gpt2()), atol=1e-5, rtol=1e-4)


def test_dict_form_and_untied_ids_match_peft(tmp_path):
    """{module: ids}: an untied lm_head, and GPT-2's tied lm_head given other ids, train rows of their own."""
    for arch, indices in (("llama", {"embed_tokens": [3, 5], "lm_head": [7, 9, 11]}),
                          ("gpt2", {"wte": [3, 5], "lm_head": [7, 9, 11]})):
        reference, ours = pair(arch, indices=indices, lora="random")
        assert get_peft_model_state_dict(ours).keys() == peft_state_dict(reference).keys()
        assert any(k.endswith("lm_head.token_adapter.trainable_tokens_delta") for k in peft_state_dict(reference))
        torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=1e-4)
        ours.save_pretrained(tmp_path / arch)
        torch.testing.assert_close(logits(PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path / arch)),
                                   logits(reference), atol=1e-5, rtol=1e-4)


def test_mixed_batch_uses_each_samples_rows():
    config = {"target_modules": ["q_proj"], "init_lora_weights": False}
    ours = get_peft_model(tiny_llama(), LoraConfig(**config, trainable_token_indices=[3, 5]))
    ours.add_adapter("other", LoraConfig(**config, trainable_token_indices=[5, 7]))
    randomize(ours, ours)
    tokens = inputs()
    mixed = logits(ours, tokens, adapter_names=["other", "__base__"])
    ours.set_adapter("other")
    torch.testing.assert_close(mixed[:1], logits(ours, tokens[:1]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1:], logits(tiny_llama(), tokens[1:]), atol=1e-5, rtol=1e-4)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("indices", "extra", "words"), [
    ([3, 128], {}, "out of range"),
    ({"embed_tokens": [1], "nope": [2]}, {}, "matches no module"),
    ({"norm": [1]}, {}, "expected an nn.Embedding"),
    ([3], {"target_modules": ["q_proj", "embed_tokens"]}, "both a LoRA target"),
    ([3], {"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"embed_tokens": [3], "lm_head": [4]}, {"ensure_weight_tying": True}, "ensure_weight_tying"),
], ids=["out-of-range", "unknown-module", "not-an-embedding", "lora-target", "modules-to-save", "tied-other-ids"])
def test_bad_indices_raise_and_change_nothing(indices, extra, words):
    ours = get_peft_model(tiny_llama_tied(), LoraConfig(target_modules=["q_proj"]))
    before = model_fingerprint(ours)
    config = LoraConfig(**{"target_modules": ["q_proj"], **extra, "trainable_token_indices": indices})
    with pytest.raises(ValueError, match=words):
        ours.add_adapter("bad", config)
    assert_same_fingerprint(before, model_fingerprint(ours))
    plain = tiny_llama_tied()
    before = model_fingerprint(plain)
    with pytest.raises(ValueError, match=words):
        get_peft_model(plain, config)
    assert_same_fingerprint(before, model_fingerprint(plain))


@pytest.mark.parametrize("indices", [[1, "2"], [1.0], [-1], "3", {"embed_tokens": [None]}])
def test_ids_that_are_not_non_negative_ints_are_refused_by_name(indices):
    with pytest.raises(ValueError, match="trainable_token_indices") as info:
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices)
    assert "expected" in str(info.value)


def test_a_file_without_its_rows_changes_nothing(tmp_path):
    reference, _ = pair("llama")
    reference.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "token_adapter" not in k}, weights)
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    before = model_fingerprint(ours)
    with pytest.raises(ValueError, match="no 'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta'"):
        ours.load_adapter(tmp_path, adapter_name="bad")
    assert_same_fingerprint(before, model_fingerprint(ours))


def test_a_file_whose_rows_disagree_with_its_config_changes_nothing(tmp_path):
    reference, _ = pair("llama")
    reference.save_pretrained(tmp_path)
    config = LoraConfig(**fields("llama", indices=[3, 5]))  # 2 ids, the file has 4 rows
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    before = model_fingerprint(ours)
    with pytest.raises(ValueError, match=r"trainable_tokens_delta has shape \(4, 32\), expected \(2, 32\)"):
        ours.load_adapter(tmp_path, adapter_name="bad", config=config)
    assert_same_fingerprint(before, model_fingerprint(ours))


def test_rows_over_a_bfloat16_base_are_float32_as_in_peft():
    config = fields("llama", indices=[3, 5])
    reference = peft_get_peft_model(tiny_llama().to(torch.bfloat16), PeftLoraConfig(**config))
    ours = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(**config))
    for listing in ("named_parameters", "named_buffers"):
        theirs = {n: t.dtype for n, t in getattr(reference, listing)() if "token_adapter" in n}
        assert {n: t.dtype for n, t in getattr(ours, listing)() if "token_adapter" in n} == theirs
        assert torch.float32 in theirs.values()
    torch.testing.assert_close(logits(ours), logits(reference), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_status_lists_the_token_layers_as_peft(arch):
    reference, ours = pair(arch)
    reference.merge_adapter()
    ours.merge_adapter()
    fields_of = ("name", "module_type", "enabled", "active_adapters", "merged_adapters", "available_adapters")

    def rows(model):
        return [tuple(getattr(status, f) for f in fields_of) for status in model.get_layer_status()]

    assert rows(ours) == rows(reference)
    assert any(row[1] == "TrainableTokensLayer" for row in rows(ours))
