"""PiSSA, OLoRA and orthogonal inits, and the PiSSA/OLoRA → LoRA file conversion, against PEFT 0.21.2.

Run: .venv/bin/python -m pytest -q tests/test_inits.py -p no:cacheprovider
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlite
from peftlite import inits
from tests.tiny_models import tiny_gpt2


class MLP(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


TARGETS = ["up", "down"]


def both(init: str, model_fn=MLP, **fields: object) -> tuple[peft.PeftModel, peftlite.PeftModel]:
    fields = {"target_modules": TARGETS, **fields}
    reference = peft.get_peft_model(model_fn(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **fields))
    ours = peftlite.get_peft_model(model_fn(), peftlite.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                   **fields))
    return reference, ours


def assert_same_state(ours: nn.Module, reference: nn.Module) -> None:
    """Every A, B and base weight equal, under PEFT's in-memory names."""
    expected = reference.state_dict()
    got = ours.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_deterministic_inits_equal_peft(init: str) -> None:
    reference, ours = both(init, use_rslora=init == "olora", rank_pattern={"down": 2})
    assert_same_state(ours, reference)
    base = MLP()
    for path in TARGETS:  # the model starts where the base did: W_res + s·B·A = W
        layer = ours.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.base_layer.weight + layer.get_delta_weight("default"),
                                   base.get_submodule(path).weight, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base(x), rtol=1e-4, atol=1e-5)


def test_pissa_on_gpt2_conv1d_equals_peft() -> None:
    reference, ours = both("pissa", tiny_gpt2, target_modules=["c_attn", "c_proj"])
    assert_same_state(ours, reference)


@pytest.mark.parametrize("niter", [1, 4])
def test_pissa_niter_equals_peft_for_the_same_seed(niter: int) -> None:
    """Randomized SVD: PEFT's pissa_init and ours draw the same numbers after the same seed."""
    reference = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["up"], init_lora_weights=False))
    layer = reference.base_model.model.up
    weight = layer.base_layer.weight.detach().clone()
    torch.manual_seed(7)
    layer.pissa_init("default", f"pissa_niter_{niter}")
    torch.manual_seed(7)
    lora_A, lora_B, residual = inits.pissa(weight, 4, layer.scaling["default"], niter=niter)
    torch.testing.assert_close(lora_A, layer.lora_A["default"].weight)
    torch.testing.assert_close(lora_B, layer.lora_B["default"].weight)
    torch.testing.assert_close(residual, layer.base_layer.weight)
    ours = peftlite.get_peft_model(MLP(), peftlite.LoraConfig(r=4, target_modules=TARGETS,
                                                              init_lora_weights=f"pissa_niter_{niter}"))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), MLP()(x), rtol=1e-4, atol=1e-5)


def test_orthogonal_equals_peft_for_the_same_seed() -> None:
    reference = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["up"]))
    layer = reference.base_model.model.up
    torch.manual_seed(3)
    layer.orthogonal_init("default")
    torch.manual_seed(3)
    lora_A, lora_B = inits.orthogonal(4, 12, 20)
    torch.testing.assert_close(lora_A, layer.lora_A["default"].weight)
    torch.testing.assert_close(lora_B, layer.lora_B["default"].weight)
    ours = peftlite.get_peft_model(MLP(), peftlite.LoraConfig(r=4, target_modules=TARGETS,
                                                              init_lora_weights="orthogonal"))
    up = ours.base_model.model.up
    assert up.lora_A["default"].weight.abs().sum() > 0 and up.lora_B["default"].weight.abs().sum() > 0
    torch.testing.assert_close(up.get_delta_weight("default"), torch.zeros(20, 12), atol=1e-6, rtol=0)
    torch.testing.assert_close(up.base_layer.weight, MLP().up.weight, rtol=0, atol=0)


def test_init_refusals_change_nothing() -> None:
    with pytest.raises(ValueError, match="even rank"):
        peftlite.get_peft_model(MLP(), peftlite.LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="orthogonal"))
    for bad in ("pissa_niter_", "pissa_niter_0", "svd", "olora_x"):
        with pytest.raises(ValueError, match="init_lora_weights"):
            peftlite.LoraConfig(init_lora_weights=bad)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match="pissa"):
        peftlite.get_peft_model(conv, peftlite.LoraConfig(target_modules=["0"], init_lora_weights="pissa"))
    assert type(conv[0]) is nn.Conv2d and all(torch.equal(before[k], v) for k, v in conv.state_dict().items())


def test_config_files_with_inits_read_in_both(tmp_path) -> None:
    for init in ("pissa", "pissa_niter_16", "olora", "orthogonal", "gaussian"):
        peft.LoraConfig(init_lora_weights=init, target_modules=TARGETS).save_pretrained(tmp_path / init)
        assert peftlite.LoraConfig.from_pretrained(str(tmp_path / init)).init_lora_weights == init


def trained(model: nn.Module, seed: int = 9) -> None:
    """Stand-in for training: move every adapter factor."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_loading_a_trained_adapter_subtracts_the_init_as_peft(init: str, tmp_path) -> None:
    """A saved PiSSA/OLoRA adapter applies to the residual base: loading re-runs the init on the base, as PEFT."""
    reference, _ = both(init)
    trained(reference)
    reference.save_pretrained(tmp_path)
    ours = peftlite.PeftModel.from_pretrained(MLP(), str(tmp_path))
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_equals_peft_and_applies_to_the_original_base(init: str, use_rslora: bool, tmp_path) -> None:
    reference, ours = both(init, use_rslora=use_rslora)
    for model, name in ((reference, "peft"), (ours, "ours")):
        model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the start as a plain init
        model.save_pretrained(tmp_path / name / "initial")
        model.peft_config["default"].init_lora_weights = init
    trained(reference)
    ours.load_state_dict(reference.state_dict())  # the same trained weights (same names in memory)
    reference.save_pretrained(tmp_path / "peft" / "lora", path_initial_model_for_weight_conversion=str(
        tmp_path / "peft" / "initial"))
    ours.save_pretrained(tmp_path / "ours" / "lora", path_initial_model_for_weight_conversion=str(
        tmp_path / "ours" / "initial"))
    expected = load_file(tmp_path / "peft" / "lora" / "adapter_model.safetensors")
    got = load_file(tmp_path / "ours" / "lora" / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    expected_config = json.loads((tmp_path / "peft" / "lora" / "adapter_config.json").read_text())
    got_config = json.loads((tmp_path / "ours" / "lora" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert got_config[field] == pytest.approx(expected_config[field]), field
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected_out = reference(x)
        for loader in (peft.PeftModel, peftlite.PeftModel):  # a plain LoRA now, on the untouched base
            converted = loader.from_pretrained(MLP(), str(tmp_path / "ours" / "lora"))
            torch.testing.assert_close(converted(x), expected_out, rtol=1e-4, atol=1e-5)
