"""A LoraModel in transformers' pipeline(...) and generate, wrapped and merged.

Run: .venv/bin/pytest tests/test_pipelines.py -x -q

LoRA weights are random (init_lora_weights=False) so the adapter visibly
changes the output; the merged model (merge_and_unload) and the real `peft`
holding the same weights are the references.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tiny_models import copy_lora_to_peft, tiny_bert, tiny_gpt2, tiny_word_tokenizer
from transformers import pipeline

from peftlite import LoraConfig, get_lora_model

WORDS = ("the a market team game stocks rise fall win lose new phone chip war peace talks "
         "league season bank rates profit space probe launch vote minister cup").split()
TEXTS = ["the team win the cup", "stocks fall as bank rates rise", "new chip launch", "peace talks"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_word_tokenizer(WORDS)


def scores(results: list[list[dict]]) -> list[dict[str, float]]:
    return [{r["label"]: r["score"] for r in result} for result in results]


def test_text_classification_pipeline_wrapped_equals_merged(tokenizer):
    base_scores = scores(pipeline("text-classification", model=tiny_bert(), tokenizer=tokenizer)(TEXTS, top_k=None))
    model = get_lora_model(tiny_bert(), LoraConfig(r=4, lora_alpha=64, task_type="SEQ_CLS", init_lora_weights=False))
    head = model.base_model.classifier.modules_to_save["default"]  # SEQ_CLS trains (and saves) the head in full
    torch.nn.init.normal_(head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    model.eval()
    wrapped = scores(pipeline("text-classification", model=model, tokenizer=tokenizer)(TEXTS, top_k=None))
    merged_model = model.merge_and_unload()
    assert "LoraModel" not in type(merged_model).__name__
    merged = scores(pipeline("text-classification", model=merged_model, tokenizer=tokenizer)(TEXTS, top_k=None))

    for lora, plain, base in zip(wrapped, merged, base_scores):
        assert lora.keys() == plain.keys() == base.keys()
        assert lora == pytest.approx(plain, abs=1e-5)
        assert lora != pytest.approx(base, abs=1e-2), "the adapter changed nothing"


def fused_gpt2():
    """GPT-2 with LoRA on q and v of the fused c_attn (a MergedLinear), random weights."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], enable_lora=[True, False, True],
                        init_lora_weights=False)
    return get_lora_model(tiny_gpt2(), config).eval()


def test_text_generation_pipeline_wrapped_equals_merged(tokenizer):
    model = fused_gpt2()
    prompt = "the team"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3), "the adapter changed nothing"

    settings = dict(max_new_tokens=8, do_sample=False)
    wrapped = pipeline("text-generation", model=model, tokenizer=tokenizer)(prompt, **settings)
    merged_model = model.merge_and_unload()
    merged = pipeline("text-generation", model=merged_model, tokenizer=tokenizer)(prompt, **settings)
    assert wrapped == merged
    assert wrapped[0]["generated_text"].startswith(prompt)
    assert len(wrapped[0]["generated_text"].split()) > len(prompt.split())


def test_generate_equals_merged_model_and_peft():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    model = get_lora_model(tiny_gpt2(), config).eval()
    peft_model = get_peft_model(tiny_gpt2(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                            fan_in_fan_out=True)).eval()
    copy_lora_to_peft(model, peft_model)
    prompt = torch.tensor([[5, 17, 42, 9], [3, 3, 60, 7]])
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(prompt))

    ours = model.generate(input_ids=prompt, **settings)
    reference = peft_model.generate(input_ids=prompt, **settings)
    with model.disable_adapter():
        base = model.generate(input_ids=prompt, **settings)
    merged = model.merge_and_unload().generate(input_ids=prompt, **settings)
    assert ours.shape == (2, 14)
    assert torch.equal(ours, reference)
    assert torch.equal(ours, merged)
    assert not torch.equal(ours, base), "the adapter changed nothing"


def test_generate_with_mixed_adapters_per_sample_matches_single_adapter_runs():
    config = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    model = get_lora_model(tiny_gpt2(), config).eval()
    prompt = torch.tensor([[5, 17, 42, 9], [3, 3, 60, 7]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(prompt))
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "__base__"], **settings)
    alone = model.generate(input_ids=prompt[:1], attention_mask=torch.ones_like(prompt[:1]),
                           **{k: v for k, v in settings.items() if k != "attention_mask"})
    with model.disable_adapter():
        base = model.generate(input_ids=prompt[1:], attention_mask=torch.ones_like(prompt[1:]),
                              **{k: v for k, v in settings.items() if k != "attention_mask"})
    assert torch.equal(mixed[:1], alone)
    assert torch.equal(mixed[1:], base)
