"""Adapters move between peftlite and the real `peft` package unchanged, both ways.

Each case saves with one library and loads with the other on a tiny model
built from a config, then compares outputs (atol 1e-5) and, for
is_trainable, the trainable-parameter count PEFT itself reports.

    .venv/bin/pytest tests/test_peft_roundtrip.py -x -q
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import LLAMA_TARGETS, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_batch

from peftlite import LoraConfig, LoraModel, MergedLinear, get_lora_model

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU (0.9 s vs 5 ms a forward)


def pixels():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def tokens():
    return {"input_ids": token_batch()}


# (name, model factory, inputs, config fields — the same names in both libraries)
CASES = [
    ("gpt2-conv1d", tiny_gpt2, tokens, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    ("llama-7-rslora-patterns", tiny_llama, tokens,
     dict(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, use_rslora=True,
          rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 4.0})),
    ("bert-seqcls-classifier", tiny_bert, tokens,
     dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"])),
    ("llama-embedding", tiny_llama, tokens, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    ("vit-conv2d-classifier", tiny_vit, pixels,
     dict(r=4, lora_alpha=8, target_modules=["projection", "query"], modules_to_save=["classifier"])),
    ("bert-bias-all", tiny_bert, tokens, dict(r=4, target_modules=["query"], bias="all")),
    ("bert-seqcls-bias-all", tiny_bert, tokens,  # PEFT also writes the head wrapper's inner bias copies
     dict(r=4, target_modules=["query"], bias="all", task_type="SEQ_CLS")),
    ("gpt2-bias-lora-only", tiny_gpt2, tokens, dict(r=4, target_modules=["c_attn"], bias="lora_only")),
]
IDS = [case[0] for case in CASES]


def perturb_trained(model, seed: int = 1) -> None:
    """Move every trainable non-LoRA tensor (biases, modules_to_save copies) so a missed one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs()).logits


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_saved(tmp_path, factory, fields, name="default"):
    # PEFT appends the SEQ_CLS head to the modules_to_save list it is given: hand it a copy.
    model = get_peft_model(factory(), PeftLoraConfig(init_lora_weights=False, **copy.deepcopy(fields)))
    perturb_trained(model)
    model.eval()
    model.save_pretrained(tmp_path)
    return model


def lite_saved(tmp_path, factory, fields):
    model = get_lora_model(factory(), LoraConfig(init_lora_weights=False, **copy.deepcopy(fields)))
    perturb_trained(model)
    model.eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("name,factory,inputs,fields", CASES, ids=IDS)
def test_saved_by_peft_loads_in_peftlite(tmp_path, name, factory, inputs, fields, is_trainable):
    peft_model = peft_saved(tmp_path, factory, fields)
    expected = logits(peft_model, inputs)
    assert not torch.allclose(expected, logits(factory(), inputs), atol=1e-3)  # the adapter does something

    lite = LoraModel.from_pretrained(factory(), str(tmp_path), is_trainable=is_trainable).eval()
    torch.testing.assert_close(logits(lite, inputs), expected, atol=1e-5, rtol=0)
    if is_trainable:
        assert trainable(lite) == trainable(PeftModel.from_pretrained(factory(), str(tmp_path), is_trainable=True))
    else:  # (PEFT leaves bias="all" biases trainable here; peftlite freezes everything)
        assert trainable(lite) == 0


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("name,factory,inputs,fields", CASES, ids=IDS)
def test_saved_by_peftlite_loads_in_peft(tmp_path, name, factory, inputs, fields, is_trainable):
    lite = lite_saved(tmp_path, factory, fields)
    expected = logits(lite, inputs)
    assert not torch.allclose(expected, logits(factory(), inputs), atol=1e-3)

    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path), is_trainable=is_trainable).eval()
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=1e-5, rtol=0)
    if is_trainable:
        reloaded = LoraModel.from_pretrained(factory(), str(tmp_path), is_trainable=True)
        assert trainable(reloaded) == trainable(peft_model)


@pytest.mark.parametrize("name,factory,inputs,fields", CASES, ids=IDS)
def test_file_keys_are_peft_keys(tmp_path, name, factory, inputs, fields):
    """Same config, same model: our keys and shapes are PEFT's (less PEFT's duplicate base copies)."""
    peft_saved(tmp_path / "peft", factory, fields)
    lite_saved(tmp_path / "lite", factory, fields)
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lite" / "adapter_model.safetensors")
    # PEFT also writes the whole embedding table it did not change, and with bias="all" the
    # modules_to_save wrapper's inner copies; neither is needed to load the adapter.
    extra = {k for k in theirs if k.endswith("embed_tokens.base_layer.weight")
             or ".original_module." in k or ".modules_to_save." in k}
    assert set(ours) == set(theirs) - extra
    assert {k: v.shape for k, v in ours.items()} == {k: theirs[k].shape for k in ours}


def test_several_adapters_in_one_directory_both_ways(tmp_path):
    fields_a = dict(r=4, target_modules=["q_proj", "v_proj"])
    fields_b = dict(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"])
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(init_lora_weights=False, **fields_a))
    peft_model.add_adapter("other", PeftLoraConfig(init_lora_weights=False, **fields_b))
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "other" / "adapter_model.safetensors").is_file()

    lite = LoraModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    lite.load_adapter(str(tmp_path / "peft"), "other", subfolder="other")
    for adapter in ("default", "other"):
        peft_model.set_adapter(adapter)
        lite.set_adapter(adapter)
        torch.testing.assert_close(logits(lite, tokens), logits(peft_model, tokens), atol=1e-5, rtol=0)

    lite.save_pretrained(tmp_path / "lite")
    assert sorted(p.name for p in (tmp_path / "lite").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    back = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lite"))
    back.load_adapter(str(tmp_path / "lite"), "other", subfolder="other")
    for adapter in ("default", "other"):
        back.set_adapter(adapter)
        lite.set_adapter(adapter)
        torch.testing.assert_close(logits(back, tokens), logits(lite, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_linear_round_trip_through_peft(tmp_path, use_rslora):
    """A fused QKV adapter is saved as PEFT's equivalent plain LoRA and comes back as MergedLinear."""
    fields = dict(r=4, lora_alpha=6, target_modules=["c_attn"], enable_lora=[True, False, True],
                  use_rslora=use_rslora)
    lite = lite_saved(tmp_path / "lite", tiny_gpt2, fields)
    expected = logits(lite, tokens)

    with pytest.warns(UserWarning, match="enable_lora"):  # PEFT ignores our extra keys, with a warning
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lite"), is_trainable=True)
    torch.testing.assert_close(logits(peft_model, tokens), expected, atol=1e-5, rtol=0)
    assert peft_model.peft_config["default"].r == 8  # groups·r, with alpha scaled to keep s

    back = LoraModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lite"))
    layer = back.base_model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MergedLinear) and back.peft_config["default"].r == 4
    assert back.peft_config["default"].lora_alpha == pytest.approx(6)
    original = lite.get_base_model().transformer.h[0].attn.c_attn
    torch.testing.assert_close(layer.factors("default")[1], original.factors("default")[1], atol=0, rtol=0)
    torch.testing.assert_close(logits(back, tokens), expected, atol=1e-5, rtol=0)

    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's own save: a plain rank-8 LoRA
    plain = LoraModel.from_pretrained(tiny_gpt2(), str(tmp_path / "peft"))
    assert not isinstance(plain.base_model.transformer.h[0].attn.c_attn, MergedLinear)
    torch.testing.assert_close(logits(plain, tokens), expected, atol=1e-5, rtol=0)


def test_changed_embedding_table_in_a_peft_file_is_loaded_as_peft_loads_it(tmp_path):
    """PEFT saves a targeted embedding's full table; if it differs from the base, both libraries use it."""
    peft_saved(tmp_path, tiny_llama, dict(r=4, target_modules=["embed_tokens"]))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    expected = logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path)), tokens)
    with pytest.warns(UserWarning, match="copied 1 base-model tensors"):
        lite = LoraModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(lite, tokens), expected, atol=1e-5, rtol=0)
