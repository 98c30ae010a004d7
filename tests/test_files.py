"""Adapter files: layout, config translation, safe and atomic IO, failed loads that change nothing, hotswap.

Real files in tmp_path, tiny transformers models; PEFT compatibility itself
is in test_peft_roundtrip.py.

    .venv/bin/pytest tests/test_files.py -x -q
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import MLP, tiny_gpt2, tiny_llama, token_batch

import peftlite.io.files as files
import peftlite.storage.atomic as atomic
from peftlite import LoraConfig, LoraModel, get_lora_model

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_llama_adapter(directory, seed=0, **fields) -> LoraModel:
    torch.manual_seed(seed)
    fields = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **fields}
    model = get_lora_model(tiny_llama(), LoraConfig(**fields))
    model.save_pretrained(directory)
    return model


def logits(model):
    with torch.no_grad():
        return model(token_batch()).logits


def snapshot(model: torch.nn.Module):
    """Everything a failed load must leave alone: parameter names, values, module types, output."""
    return ({name: p.detach().clone() for name, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()], logits(model))


def assert_unchanged(model, before) -> None:
    params, types, out = before
    now = dict(model.named_parameters())
    assert list(now) == list(params)
    for name, value in params.items():
        assert torch.equal(now[name], value), name
    assert [type(m).__name__ for m in model.modules()] == types
    assert torch.equal(logits(model), out)


def edit_json(directory, **changes):
    path = directory / CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(directory, change):
    path = directory / WEIGHTS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
BAD_INPUTS = {
    "missing dir": (lambda d: d / "nope", FileNotFoundError, "nope"),
    "missing weights": (lambda d: (d / WEIGHTS).unlink() or d, FileNotFoundError, "adapter_model.safetensors"),
    "missing config": (lambda d: (d / CONFIG).unlink() or d, FileNotFoundError, "adapter_config.json"),
    "truncated safetensors": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]) and d,
                              ValueError, "not a readable safetensors"),
    "corrupt safetensors": (lambda d: (d / WEIGHTS).write_bytes(b"\xff" * 64) and d,
                            ValueError, "not a readable safetensors"),
    "invalid json": (lambda d: (d / CONFIG).write_text("{r: 4,") and d, ValueError, "not valid JSON"),
    "json not an object": (lambda d: (d / CONFIG).write_text("[1, 2]") and d, ValueError, "expected a JSON object"),
    "non-LORA peft_type": (lambda d: edit_json(d, peft_type="IA3") or d, ValueError, "peft_type='IA3'"),
    "dora": (lambda d: edit_json(d, use_dora=True) or d, ValueError, "use_dora=True"),
    "lora_bias": (lambda d: edit_json(d, lora_bias=True) or d, ValueError, "lora_bias=True"),
    "unknown init": (lambda d: edit_json(d, init_lora_weights="pissa_niter_0") or d, ValueError, "pissa_niter_0"),
    "bad config value": (lambda d: edit_json(d, r=0) or d, ValueError, "r=0"),
    "rank mismatch": (lambda d: edit_json(d, r=8) or d, ValueError, r"shape \(4, 32\), expected \(8, 32\)"),
    "shape mismatch": (lambda d: edit_weights(d, lambda t: t.update({Q_A: torch.zeros(4, 31)})) or d,
                       ValueError, r"shape \(4, 31\), expected \(4, 32\)"),
    "module the model lacks": (lambda d: edit_weights(d, lambda t: t.update(
        {Q_A.replace("layers.0", "layers.9"): torch.zeros(4, 32)})) or d, ValueError, "layers.9"),
    "missing B": (lambda d: edit_weights(d, lambda t: t.pop(Q_B)) or d, ValueError, "no lora_B"),
    "no lora weights": (lambda d: edit_weights(d, lambda t: [t.pop(k) for k in list(t)]) or d,
                        ValueError, "no LoRA weights"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_failed_load_raises_and_changes_nothing(tmp_path, case):
    save_llama_adapter(tmp_path / "adapter")
    make_bad, error, message = BAD_INPUTS[case]
    bad = make_bad(tmp_path / "adapter")
    model = get_lora_model(tiny_llama(seed=3), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.load_adapter(str(bad), "new")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"

    base = tiny_llama(seed=3)
    before = snapshot(base)
    with pytest.raises(error, match=message):
        LoraModel.from_pretrained(base, str(bad))
    assert_unchanged(base, before)


def test_load_options(tmp_path):
    saved = save_llama_adapter(tmp_path)
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown load options \['revison'\]"):
        model.load_adapter(str(tmp_path), "a", revison="main")
    model.load_adapter(str(tmp_path), "a", low_cpu_mem_usage=True)  # PEFT's: factors made on meta, then filled
    assert all(p.device.type == "cpu" for _, layer in model.lora_layers() for p in layer.adapter_parameters("a"))
    model.set_adapter("a")
    torch.testing.assert_close(logits(model), logits(saved), atol=1e-6, rtol=0)


def test_merged_linear_that_is_no_longer_block_diagonal_is_refused(tmp_path):
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora=[True, False, True],
                                                   init_lora_weights=False))
    model.save_pretrained(tmp_path)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    edit_weights(tmp_path, lambda t: t[key].__setitem__((40, 0), 1.0))  # a row of the disabled K slice
    base = tiny_gpt2()
    before = snapshot(base)
    with pytest.raises(ValueError, match="block-diagonal"):
        LoraModel.from_pretrained(base, str(tmp_path))
    assert_unchanged(base, before)


def test_layout_config_and_model_card(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = "org/tiny-llama"
    model = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj"], merge_weights=True))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG, WEIGHTS, "second"]
    assert sorted(os.listdir(tmp_path / "second")) == ["README.md", CONFIG, WEIGHTS]
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["merge_weights"] is True
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["inference_mode"] is True
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: org/tiny-llama" in front
    assert set(load_file(tmp_path / "second" / WEIGHTS)) == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}

    model.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert os.listdir(tmp_path / "only") == ["second"]
    with pytest.raises(ValueError, match="'third'"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["third"])


def test_save_options(tmp_path):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)  # another process writes
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(ValueError, match="safe_serialization=False"):  # writing pickle is never offered
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin").exists()


def test_existing_model_card_keeps_its_text(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nNotes.\n")
    save_llama_adapter(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "# My adapter" in card and "license: mit" in card and "library_name: peft" in card


def test_a_model_card_with_broken_front_matter_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: [mit\n---\nMine.\n")
    with pytest.warns(UserWarning, match="README.md left unchanged"):
        save_llama_adapter(tmp_path)
    assert (tmp_path / "README.md").read_text() == "---\nlicense: [mit\n---\nMine.\n"
    assert (tmp_path / WEIGHTS).is_file()


def test_merged_linear_config_is_written_as_peft_plain_lora_and_read_back(tmp_path):
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn"], enable_lora=[True, False, True],
                        rank_pattern={"h\\.1\\.attn\\.c_attn": 2}, alpha_pattern={"c_attn": 3.0})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    groups = 2  # PEFT sees rank groups·r and alpha groups·alpha: the same s = alpha / r
    assert (data["r"], data["lora_alpha"]) == (4 * groups, 6 * groups)
    assert data["rank_pattern"] == {"h\\.1\\.attn\\.c_attn": 2 * groups}
    assert data["alpha_pattern"] == {"c_attn": 3.0 * groups}
    assert LoraConfig.from_pretrained(str(tmp_path)) == config


def test_unknown_config_keys_warn_once_and_are_ignored(tmp_path):
    saved = save_llama_adapter(tmp_path)
    edit_json(tmp_path, some_future_option=3, another=None, peft_version="0.99", auto_mapping=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LoraModel.from_pretrained(tiny_llama(), str(tmp_path))
    messages = [str(w.message) for w in caught if "peftlite does not know" in str(w.message)]
    assert len(messages) == 1 and "['another', 'some_future_option']" in messages[0]
    torch.testing.assert_close(logits(model), logits(saved), atol=1e-6, rtol=0)


def test_legacy_bin_is_read_weights_only(tmp_path):
    saved = save_llama_adapter(tmp_path)
    torch.save(load_file(tmp_path / WEIGHTS), tmp_path / "adapter_model.bin")
    (tmp_path / WEIGHTS).unlink()
    model = LoraModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(model), logits(saved), atol=1e-6, rtol=0)


class _Payload:
    """Unpickling this would run os.system: a weights-only load must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_legacy_bin_never_runs_pickle_code(tmp_path):
    save_llama_adapter(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "adapter_model.bin")
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(ValueError, match="weights-only"):
        LoraModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not marker.exists()


def test_keys_without_peft_prefix_load(tmp_path):
    """transformers' own PEFT integration writes keys without `base_model.model.`."""
    saved = save_llama_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, tmp_path / WEIGHTS)
    model = LoraModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(model), logits(saved), atol=1e-6, rtol=0)


def test_save_is_atomic_when_a_write_fails(tmp_path, monkeypatch):
    save_llama_adapter(tmp_path, seed=0)
    old = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS, CONFIG, "README.md")}
    model = get_lora_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))

    def crash_mid_write(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(files, "write_safetensors", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted(old)  # no temporary files left

    model.save_pretrained(tmp_path)  # and a successful save replaces all three
    assert load_file(tmp_path / WEIGHTS)[Q_A].shape == (8, 32)
    assert sorted(os.listdir(tmp_path)) == sorted(old)


def test_atomic_write_all_removes_staged_files_when_a_writer_fails(tmp_path):
    (tmp_path / "a.txt").write_text("old a")

    def fail(path):
        open(path, "w").write("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        atomic.atomic_write_all(tmp_path, {"a.txt": files.text_writer("new a"), "b.txt": fail})
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_save_to_a_file_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file")


# ---- hotswap --------------------------------------------------------------------------------------
def test_hotswap_copies_in_place_and_matches_a_fresh_load(tmp_path):
    save_llama_adapter(tmp_path / "a", seed=0)
    b = save_llama_adapter(tmp_path / "b", seed=1, lora_alpha=16)
    model = LoraModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    params = {name: p for name, p in model.named_parameters()}
    model.hotswap_adapter(str(tmp_path / "b"), "default")
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    torch.testing.assert_close(logits(model), logits(b), atol=1e-6, rtol=0)
    assert model.peft_config["default"].lora_alpha == 16


def test_hotswap_keeps_a_compiled_model_working(tmp_path):
    def mlp_adapter(seed):
        torch.manual_seed(seed)
        return get_lora_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    mlp_adapter(0).save_pretrained(tmp_path / "a")
    b = mlp_adapter(1)
    b.save_pretrained(tmp_path / "b")
    model = LoraModel.from_pretrained(MLP(), str(tmp_path / "a"))
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    x = torch.randn(4, 10)
    with torch.no_grad():
        compiled(x)
        model.hotswap_adapter(str(tmp_path / "b"), "default")
        torch.testing.assert_close(compiled(x), b(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fields,message", [
    (dict(target_modules=["q_proj", "k_proj"]), "other modules"),
    (dict(r=2), "has rank 2 in the file, expected 4"),
])
def test_hotswap_mismatch_raises_and_changes_nothing(tmp_path, fields, message):
    save_llama_adapter(tmp_path / "a")
    save_llama_adapter(tmp_path / "b", seed=1, **fields)
    model = LoraModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.hotswap_adapter(str(tmp_path / "b"), "default")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="'missing'"):
        model.hotswap_adapter(str(tmp_path / "a"), "missing")
