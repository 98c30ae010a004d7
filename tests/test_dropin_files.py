"""peftlite as a drop-in for PEFT: save_pretrained, from_pretrained, load_adapter, dtypes and the model card.

The same user code runs against `peft` and `peftlite` (tests/dropin_support.py);
files written by one are read by the other. Where peftlite is deliberately stricter
(PEFT drops or corrupts weights) the test checks both behaviours.

    .venv/bin/python -m pytest -q tests/test_dropin_files.py -p no:cacheprovider
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import peftlite
from tests.dropin_support import Q_V, both, llama_lora, logits, outcome, same_weights
from tests.tiny_models import LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_batch


# ---- files: save_pretrained, from_pretrained, load_adapter ----------------------------------------------------------
def saved_files(directory: Path) -> dict[str, Any]:
    """What a directory written by save_pretrained holds: its files and each weights file's tensor keys."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    tensors = {f: sorted(load_file(directory / f)) for f in files if f.endswith(".safetensors")}
    return {"files": files, "tensors": tensors}


def test_save_pretrained_keywords(tmp_path: Path) -> None:
    def save(lib: ModuleType) -> dict[str, Any]:
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(target_modules=["c_attn", "wte"], r=4))
        model.add_adapter("second", lib.LoraConfig(target_modules=["c_attn"], r=2))
        out = tmp_path / lib.__name__
        model.save_pretrained(out / "all", safe_serialization=True, save_embedding_layers=False)
        model.save_pretrained(out / "one", selected_adapters=["second"])
        return {"all": saved_files(out / "all"), "one": saved_files(out / "one")}

    theirs, ours = both(save)
    # PEFT writes one README.md at the top of every save; peftlite one per adapter folder it writes,
    # so that push_to_hub(adapter_name=...) of a subfolder uploads a card with it.
    assert "README.md" in ours["all"]["files"] and "second/README.md" in ours["one"]["files"]
    for layout in (theirs, ours):
        for saved in layout.values():
            saved["files"] = [f for f in saved["files"] if not f.endswith("README.md")]
    assert ours == theirs


def test_save_embedding_layers_true_is_refused(tmp_path: Path) -> None:
    """Stricter: PEFT writes base embedding tables into the adapter; peftlite refuses rather than drop them."""
    model = llama_lora(peftlite)
    with pytest.raises(ValueError, match="save_embedding_layers=True"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_from_pretrained_keywords_eval_mode_and_load_result(tmp_path: Path) -> None:
    reference = llama_lora(peft, lora_dropout=0.1)
    reference.save_pretrained(tmp_path / "adapter")
    reference.eval()

    def load(lib: ModuleType) -> dict[str, Any]:
        model = lib.PeftModel.from_pretrained(
            tiny_llama(), tmp_path / "adapter", config=lib.LoraConfig.from_pretrained(str(tmp_path / "adapter")),
            autocast_adapter_dtype=True, low_cpu_mem_usage=False, ephemeral_gpu_offload=False, torch_device="cpu",
            is_trainable=False)
        loaded = [m.training for m in model.modules()]
        result = model.load_adapter(str(tmp_path / "adapter"), adapter_name="again", is_trainable=True)
        return {"training": loaded, "result": (result.missing_keys, result.unexpected_keys),
                "logits": logits(model), "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                "training after": {n: m.training for n, m in model.named_modules()},
                "inference_mode": {name: c.inference_mode for name, c in model.peft_config.items()}}

    theirs, ours = both(load)
    assert not any(ours["training"]) and not any(theirs["training"])
    # PEFT creates the new adapter's modules in training mode inside an eval model; peftlite
    # gives them their layer's mode, so dropout stays off until model.train()
    assert not any(ours["training after"].values())
    assert {n for n, t in theirs["training after"].items() if t} <= {n for n in theirs["training after"]
                                                                     if n.endswith(".again")}
    assert ours["result"] == theirs["result"]
    assert ours["trainable"] == theirs["trainable"]
    assert ours["inference_mode"] == theirs["inference_mode"] == {"default": True, "again": False}
    torch.testing.assert_close(ours["logits"], theirs["logits"])
    torch.testing.assert_close(ours["logits"], logits(reference))


@pytest.mark.parametrize("keyword", [{"device_map": "cpu"}, {"torch_device": "cpu"}, {"ephemeral_gpu_offload": False},
                                     {"use_safetensors": True}, {"max_memory": None}, {"low_cpu_mem_usage": True},
                                     {"autocast_adapter_dtype": False}, {"revision": None}])
def test_from_pretrained_accepts_peft_keywords(tmp_path: Path, keyword: dict[str, Any]) -> None:
    reference = llama_lora(peft)
    reference.save_pretrained(tmp_path)
    theirs, ours = both(lambda lib: logits(lib.PeftModel.from_pretrained(tiny_llama(), tmp_path, **keyword)))
    torch.testing.assert_close(ours, theirs)


def test_from_pretrained_key_mapping_and_load_adapter_eval_mode(tmp_path: Path) -> None:
    """An adapter saved with other module names loads through PEFT's key_mapping (regexes on unprefixed keys)."""
    reference = llama_lora(peft)
    tensors = {k.replace(".self_attn.", ".attention."): v for k, v in peft.get_peft_model_state_dict(reference).items()}
    reference.save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    mapping = {r"\.attention\.": ".self_attn."}

    def load(lib: ModuleType) -> tuple[torch.Tensor, bool, list[bool]]:
        model = lib.PeftModel.from_pretrained(tiny_llama().train(), tmp_path, key_mapping=mapping, is_trainable=True)
        trained = model.training
        model.load_adapter(tmp_path, "second", key_mapping=mapping)
        return logits(model), trained, [m.training for m in model.modules()]

    theirs, ours = both(load)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[0], logits(reference.eval()))
    assert ours[1] is theirs[1] is True
    assert not any(ours[2]) and not any(theirs[2])  # load_adapter(is_trainable=False) puts the model in eval mode, as PEFT


def test_from_pretrained_low_cpu_mem_usage(tmp_path: Path) -> None:
    reference = llama_lora(peft)
    reference.save_pretrained(tmp_path)

    def load(lib: ModuleType) -> tuple[torch.Tensor, set[str]]:
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
        return logits(model), {p.device.type for p in model.parameters()}

    (their_logits, their_devices), (our_logits, our_devices) = both(load)
    assert our_devices == their_devices == {"cpu"}
    torch.testing.assert_close(our_logits, their_logits)
    torch.testing.assert_close(our_logits, logits(reference.eval()))


def test_low_cpu_mem_usage_meta_base_stays_on_meta_and_adapter_is_filled(tmp_path: Path) -> None:
    """Stricter than PEFT 0.21.2, which leaves the loaded LoRA weights on meta over a meta base (they are lost)."""
    llama_lora(peft).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    with torch.device("meta"):
        base = tiny_llama()
    model = peftlite.PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for n, p in model.named_parameters() if "lora_" not in n} == {"meta"}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_A["default"].weight.device.type != "meta"
    torch.testing.assert_close(layer.lora_A["default"].weight,
                               saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])

    with torch.device("meta"):
        peft_base = tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(peft_base, tmp_path, low_cpu_mem_usage=True)
    peft_layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert peft_layer.lora_A["default"].weight.device.type == "meta"  # PEFT's weights are gone


def test_get_peft_model_low_cpu_mem_usage_puts_adapters_on_meta() -> None:
    theirs, ours = both(lambda lib: lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=Q_V),
                                                       low_cpu_mem_usage=True))
    assert [(n, p.device.type) for n, p in ours.named_parameters()] == \
           [(n, p.device.type) for n, p in theirs.named_parameters()]


def test_ignore_mismatched_sizes(tmp_path: Path) -> None:
    llama_lora(peft, r=4).save_pretrained(tmp_path)
    wrong = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}

    def load(lib: ModuleType) -> Any:
        model = llama_lora(lib, r=8, init_lora_weights=True)
        strict = outcome(lambda: lib.set_peft_model_state_dict(model, wrong))[:2]
        loose = outcome(lambda: lib.set_peft_model_state_dict(model, wrong, ignore_mismatched_sizes=True))
        return strict, loose, logits(model)

    theirs, ours = both(load)
    assert ours[0][0] == theirs[0][0] == "raise"
    assert ours[1][0] == theirs[1][0] == "ok"
    assert bool(ours[1][2]) == bool(theirs[1][2])  # PEFT warns about the skipped tensors
    assert ours[1][1].missing_keys == [k for k in theirs[1][1].missing_keys if ".lora_" in k]
    assert ours[1][1].missing_keys  # the skipped pairs are reported, as in PEFT
    torch.testing.assert_close(ours[2], theirs[2])


def test_merge_and_unload_progressbar() -> None:
    theirs, ours = both(llama_lora)
    same_weights(theirs, ours)
    expected = logits(theirs.eval())
    merged_theirs = theirs.merge_and_unload(progressbar=True)
    merged_ours = ours.merge_and_unload(progressbar=True, safe_merge=True)
    assert type(merged_ours) is type(merged_theirs)
    assert list(merged_ours.state_dict()) == list(merged_theirs.state_dict())
    torch.testing.assert_close(logits(merged_ours), logits(merged_theirs))
    torch.testing.assert_close(logits(merged_ours), expected)


# ---- training quality --------------------------------------------------------------------------------------------
def test_bf16_adapters_stay_float32_and_train_as_in_peft() -> None:
    def train(lib: ModuleType, autocast: bool = True) -> tuple[set[torch.dtype], float]:
        base = tiny_llama().to(torch.bfloat16).train()
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=LLAMA_TARGETS, r=8),
                                   autocast_adapter_dtype=autocast)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(10):
            ids = token_batch(seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = [(p.detach() != before[n]).float().mean().item()
                   for n, p in model.named_parameters() if "lora_A" in n]
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        return dtypes, min(changed)

    theirs, ours = both(train)
    assert ours[0] == theirs[0] == {torch.float32}
    assert ours[1] == theirs[1] == 1.0
    their_opt_out, our_opt_out = both(lambda lib: train(lib, autocast=False))
    assert our_opt_out[0] == their_opt_out[0] == {torch.bfloat16}


@pytest.mark.parametrize("autocast", [True, False])
def test_from_pretrained_autocast_adapter_dtype_over_a_bf16_base(tmp_path: Path, autocast: bool) -> None:
    llama_lora(peft).save_pretrained(tmp_path)

    def load(lib: ModuleType) -> tuple[set[torch.dtype], torch.Tensor]:
        model = lib.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path,
                                              autocast_adapter_dtype=autocast)
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}, logits(model)

    theirs, ours = both(load)
    assert ours[0] == theirs[0] == ({torch.float32} if autocast else {torch.bfloat16})
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-2, rtol=1.6e-2)  # bf16 logits: last-bit rounding


# ---- the model card -----------------------------------------------------------------------------------------------
def card_metadata(directory: Path) -> dict[str, Any]:
    text = (directory / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


@pytest.mark.parametrize("name_or_path", ["", "some-org/tiny-llama"])
def test_model_card_metadata_matches_peft(tmp_path: Path, name_or_path: str) -> None:
    def save(lib: ModuleType) -> dict[str, Any]:
        base = tiny_llama()
        base.config._name_or_path = base.name_or_path = name_or_path
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=Q_V, task_type="CAUSAL_LM"))
        model.save_pretrained(tmp_path / lib.__name__)
        return card_metadata(tmp_path / lib.__name__)

    theirs, ours = both(save)
    assert ours["library_name"] == theirs["library_name"] == "peft"
    assert ours.get("pipeline_tag") == theirs.get("pipeline_tag")
    if name_or_path:
        assert ours["base_model"] == theirs["base_model"] == name_or_path
        assert ours["tags"] == theirs["tags"]
    else:  # PEFT writes `base_model: ''` and a tag `base_model:adapter:`, which the Hub rejects
        assert theirs["base_model"] == ""
        assert "base_model" not in ours
        assert ours["tags"] == [t for t in theirs["tags"] if t != "base_model:adapter:"]
    their_text = (tmp_path / "peft" / "README.md").read_text().split("---", 2)[2]
    our_text = (tmp_path / "peftlite" / "README.md").read_text().split("---", 2)[2]
    assert [h for h in our_text.splitlines() if h.startswith("#")] == \
           [h for h in their_text.splitlines() if h.startswith("#")]


def test_model_card_no_base_model_for_a_local_path(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    model = peftlite.get_peft_model(base, peftlite.LoraConfig(target_modules=Q_V, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    metadata = card_metadata(tmp_path / "adapter")
    assert "base_model" not in metadata and metadata["pipeline_tag"] == "text-generation"
