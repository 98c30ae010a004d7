"""Layer kinds beyond Linear, against the real `peft` 0.21.2 (and loralib), both directions.

MoE experts through `target_parameters` (Mixtral, Qwen3-MoE, GPT-OSS), nn.Conv1d /
nn.Conv3d, nn.MultiheadAttention, `trainable_token_indices`, and loralib-era fused-QKV
files. Each case gives both libraries the same weights and compares outputs, gradients,
merged weights and saved files.

    .venv/bin/python -m pytest -q -x tests/test_layer_kinds.py -p no:cacheprovider
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from safetensors.torch import load_file
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from peftlite import LoraConfig, LoraModel, get_peft_model
from peftlite.fast import experts_gate
from peftlite.fast.experts import AutogradInput, SwiGLU

warnings.filterwarnings("ignore", category=FutureWarning)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


# ---- tiny MoE models: distinct d, inter, E so a transposed factor cannot pass ----------------------
def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=4, num_experts_per_tok=2)).eval()


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=5, num_experts_per_tok=2)).eval()


def tiny_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)).eval()
    with torch.no_grad():  # transformers leaves GPT-OSS expert biases at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("_bias"):
                param.normal_(0, 0.1)
    return model


MOE_MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def moe_fields(**extra) -> dict:
    return {**dict(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=list(EXPERTS),
                   init_lora_weights=False), **extra}


def copy_lora_by_name(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give `target` the LoRA tensors of `source` (both keep PEFT's in-memory names)."""
    values = {n: p for n, p in source.named_parameters() if "lora_" in n}
    own = {n: p for n, p in target.named_parameters() if "lora_" in n}
    assert own.keys() == values.keys()
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(values[name])


def pair(factory, fields: dict) -> tuple:
    """(PEFT model, peftlite model) of the same base with the same LoRA weights."""
    reference = peft_get_peft_model(factory(), PeftLoraConfig(**fields))
    ours = get_peft_model(factory(), LoraConfig(**fields))
    copy_lora_by_name(reference, ours)
    return reference, ours


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


# ---- MoE experts (target_parameters) ---------------------------------------------------------------
@pytest.mark.parametrize("arch", list(MOE_MODELS))
@pytest.mark.parametrize("fast", [True, False], ids=["routed", "reference"])
def test_moe_outputs_match_peft(arch, fast):
    reference, ours = pair(MOE_MODELS[arch], moe_fields())
    ours.base_model.adapter_state.fast = fast
    base = logits(MOE_MODELS[arch](), ids())
    expected = logits(reference, ids())
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(logits(ours, ids()), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_moe_training_grads_match_peft(arch):
    reference, ours = pair(MOE_MODELS[arch], moe_fields())
    grads = []
    for model in (reference, ours):
        model.train()
        tokens = ids(seed=3)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("arch", "gate"), [("mixtral", SwiGLU), ("qwen3_moe", SwiGLU), ("gpt_oss", AutogradInput)])
def test_moe_gate_backward_is_written_out_only_for_the_default_silu_gate(arch, gate):
    experts = MOE_MODELS[arch]().model.layers[0].mlp.experts
    assert type(experts_gate(experts)) is gate
    experts.act_fn = torch.nn.GELU()  # any other activation: autograd through the module's own gate
    assert type(experts_gate(experts)) is AutogradInput


def test_swiglu_matches_autograd_through_the_default_gate():
    experts = tiny_mixtral().model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(9, 48, dtype=torch.float64, generator=generator)
    grad_x = torch.randn(9, 24, dtype=torch.float64, generator=generator)
    leaf = h.clone().requires_grad_(True)
    expected = experts._apply_gate(leaf)
    expected.backward(grad_x)
    torch.testing.assert_close(SwiGLU()(h), expected.detach(), atol=0, rtol=0)
    x, backward = SwiGLU().recompute(h)
    torch.testing.assert_close(x, expected.detach(), atol=0, rtol=0)
    torch.testing.assert_close(backward(grad_x.clone()), leaf.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_moe_two_active_adapters_routed_grads_equal_the_reference(arch):
    """Both adapters' pairs go through one routed node per projection (SwiGLU and autograd gates)."""
    grads = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(MOE_MODELS[arch](), LoraConfig(**moe_fields()))
        model.add_adapter("two", LoraConfig(**moe_fields(r=3)))
        model.base_model.set_adapter(["default", "two"])
        model.base_model.adapter_state.fast = fast
        model.train()
        tokens = ids(seed=3)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n and ".two." in n for n in grads[0])
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def saved_activation_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the storages autograd saves for backward while `module` runs, its parameters' own excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    sizes = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(sizes.values())


def test_moe_routed_lora_saves_less_than_the_frozen_experts():
    """LoRA training on the experts keeps fewer activations than the frozen experts module alone: it saves
    hidden (T, d), not the routed rows (S, d), and runs the gate again in backward rather than keep it."""
    _, ours = pair(tiny_mixtral, moe_fields())
    ours.base_model.adapter_state.fast = True
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(128, 32, generator=generator, requires_grad=True)
    routing = (torch.randint(0, 4, (128, 2), generator=generator), torch.rand(128, 2, requires_grad=True))
    frozen = saved_activation_bytes(tiny_mixtral().model.layers[0].mlp.experts, hidden, *routing)
    lora = saved_activation_bytes(ours.base_model.model.model.layers[0].mlp.experts, hidden, *routing)
    assert 0 < lora <= frozen


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_moe_merge_unmerge_and_unload(arch):
    reference, ours = pair(MOE_MODELS[arch], moe_fields())
    expected = logits(ours, ids())
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids()), expected, atol=1e-5, rtol=1e-4)
    reference.merge_adapter()
    experts = "base_model.model.model.layers.1.mlp.experts"
    for param in ("gate_up_proj", "down_proj"):
        ref_param = dict(reference.named_parameters())[f"{experts}.base_layer.base_layer.{param}"]
        torch.testing.assert_close(dict(ours.named_parameters())[f"{experts}.base_layer.base_layer.{param}"],
                                   ref_param, atol=1e-6, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(logits(ours, ids()), expected, atol=1e-5, rtol=1e-4)
    merged = ours.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(merged, ids()), expected, atol=1e-5, rtol=1e-4)
    _, fresh = pair(MOE_MODELS[arch], moe_fields())
    plain = fresh.unload()
    torch.testing.assert_close(logits(plain, ids()), logits(MOE_MODELS[arch](), ids()), atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_moe_files_both_ways(arch, tmp_path):
    reference, ours = pair(MOE_MODELS[arch], moe_fields(rank_pattern={"layers.1.mlp.experts.down_proj": 3}))
    reference.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours_file.keys() == theirs_file.keys()
    assert any(k.endswith("experts.base_layer.lora_A.weight") for k in ours_file)
    experts = ours.base_model.model.model.layers[1].mlp.experts
    assert ours_file["base_model.model.model.layers.1.mlp.experts.lora_A.weight"].shape[0] == 3 * experts.num_experts
    for name, tensor in theirs_file.items():
        torch.testing.assert_close(ours_file[name], tensor, atol=0, rtol=0, msg=name)
    expected = logits(reference, ids())
    loaded_ours = LoraModel.from_pretrained(MOE_MODELS[arch](), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded_ours, ids()), expected, atol=1e-5, rtol=1e-4)
    loaded_peft = PeftModel.from_pretrained(MOE_MODELS[arch](), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_peft, ids()), expected, atol=1e-5, rtol=1e-4)


def test_moe_one_parameter_and_no_modules(tmp_path):
    """Only down_proj, no module targets (target_modules=[]): the wrapper sits at `experts` itself."""
    fields = dict(r=2, target_modules=[], target_parameters=["down_proj"], init_lora_weights=False)
    reference, ours = pair(tiny_mixtral, fields)
    torch.testing.assert_close(logits(ours, ids()), logits(reference, ids()), atol=1e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(f"base_model.model.model.layers.{i}.mlp.experts.lora_{p}.weight"
                          for i in range(2) for p in "AB")


def test_moe_refusals_name_the_problem():
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(tiny_mixtral(), LoraConfig(**moe_fields(lora_dropout=0.1)))
    with pytest.raises(ValueError, match="matched no parameter.*gate_up_proj"):
        get_peft_model(tiny_mixtral(), LoraConfig(r=2, target_modules=[], target_parameters=["experts.nothing"]))
    _, ours = pair(tiny_mixtral, moe_fields())
    ours.add_adapter("other", LoraConfig(**moe_fields()))
    with pytest.raises(ValueError, match="mixed-adapter"):
        ours(input_ids=ids(), adapter_names=["default", "other"])


def test_moe_second_adapter_reuses_wrappers():
    reference, ours = pair(tiny_mixtral, moe_fields())
    for model, config_class in ((reference, PeftLoraConfig), (ours, LoraConfig)):
        model.add_adapter("second", config_class(**moe_fields(r=3)))
    assert ({n for n, _ in ours.named_parameters() if "lora_" in n}
            == {n for n, _ in reference.named_parameters() if "lora_" in n})
    copy_lora_by_name(reference, ours)
    for model in (reference, ours):
        model.set_adapter("second")
    torch.testing.assert_close(logits(ours, ids()), logits(reference, ids()), atol=1e-5, rtol=1e-4)


# ---- nn.Conv1d / nn.Conv3d -------------------------------------------------------------------------
class ConvModel(torch.nn.Module):
    """Conv1d over a sequence and Conv3d over a volume, both into one head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv1d(3, 6, kernel_size=3, padding=1, stride=2)
        self.conv3 = torch.nn.Conv3d(2, 4, kernel_size=(1, 3, 3), padding=(0, 1, 1), dilation=1)
        self.head = torch.nn.Linear(6 * 4 + 4 * 2 * 3 * 3, 5)
        self.eval()

    def forward(self, seq: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv1(seq).flatten(1), self.conv3(volume).flatten(1)], dim=-1))


def conv_inputs(batch: int = 4) -> dict:
    generator = torch.Generator().manual_seed(5)
    return {"seq": torch.randn(batch, 3, 8, generator=generator),
            "volume": torch.randn(batch, 2, 2, 3, 3, generator=generator)}


CONV_FIELDS = dict(r=3, lora_alpha=5, target_modules=["conv1", "conv3"], init_lora_weights=False)


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**conv_inputs(), **kwargs)


def assert_files_load_both_ways(reference, ours, base_model, outputs, expected, tmp_path, same_keys=True) -> None:
    """Both libraries save; (same_keys) the two files hold the same keys; each loads in the other library onto a
    fresh `base_model()` and gives `expected` from `outputs(model)`."""
    reference.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    if same_keys:
        assert (load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
                == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys())
    with torch.no_grad():
        torch.testing.assert_close(outputs(LoraModel.from_pretrained(base_model(), tmp_path / "peft")), expected,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(outputs(PeftModel.from_pretrained(base_model(), tmp_path / "ours")), expected,
                                   atol=1e-5, rtol=1e-4)


def test_conv1d_conv3d_outputs_merge_and_files_match_peft(tmp_path):
    reference, ours = pair(ConvModel, CONV_FIELDS)
    expected = run(reference)
    assert not torch.allclose(expected, run(ConvModel()), atol=1e-3)
    torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=1e-4)
    for model in (reference, ours):
        model.merge_adapter()
    for name in ("conv1", "conv3"):
        torch.testing.assert_close(getattr(ours.base_model.model, name).base_layer.weight,
                                   getattr(reference.base_model.model, name).base_layer.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=1e-4)
    ours.unmerge_adapter()
    reference.unmerge_adapter()
    assert_files_load_both_ways(reference, ours, ConvModel, run, expected, tmp_path)


def test_conv1d_conv3d_mixed_batch_matches_peft():
    reference, ours = pair(ConvModel, CONV_FIELDS)
    for model, config_class in ((reference, PeftLoraConfig), (ours, LoraConfig)):
        model.add_adapter("other", config_class(**{**CONV_FIELDS, "r": 2}))
        model.eval()
    copy_lora_by_name(reference, ours)
    names = ["other", "__base__", "default", "other"]
    expected = run(reference, adapter_names=names)
    torch.testing.assert_close(run(ours, adapter_names=names), expected, atol=1e-5, rtol=1e-4)
    ours.set_adapter("other")
    torch.testing.assert_close(run(ours)[0], expected[0], atol=1e-5, rtol=1e-4)


# ---- seed-era fused-QKV files (PEFT 0.2/0.3, loralib) ----------------------------------------------
ENABLE = [True, False, True]


def legacy_adapter(tmp_path, r: int = 3, alpha: float = 7.0, conv_b: bool = False, binary: bool = False,
                   loralib_names: bool = False) -> dict:
    """Write a tiny GPT-2 adapter as PEFT 0.2/0.3 did: enable_lora, r per slice, loralib's factor shapes.

    Returns {c_attn path: loralib.MergedLinear holding the same base weights and factors}.
    """
    import json

    import loralib
    from safetensors.torch import save_file
    from tiny_models import tiny_gpt2
    base = tiny_gpt2()
    tmp_path.mkdir(parents=True, exist_ok=True)
    references, tensors = {}, {}
    generator = torch.Generator().manual_seed(7)
    for i in range(2):
        path = f"transformer.h.{i}.attn.c_attn"
        c_attn = base.get_submodule(path)
        layer = loralib.MergedLinear(32, 96, r=r, lora_alpha=alpha, enable_lora=ENABLE, fan_in_fan_out=True,
                                     merge_weights=False)
        with torch.no_grad():
            layer.weight.copy_(c_attn.weight)  # loralib keeps a fan_in_fan_out weight as (in, out), as Conv1D
            layer.bias.copy_(c_attn.bias)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        layer.eval()  # loralib's train() returns None
        references[path] = layer
        prefix = "" if loralib_names else "base_model.model."
        suffix = "" if loralib_names else ".weight"
        lora_B = layer.lora_B.detach().unsqueeze(-1) if conv_b else layer.lora_B.detach()
        tensors[f"{prefix}{path}.lora_A{suffix}"] = layer.lora_A.detach().clone()
        tensors[f"{prefix}{path}.lora_B{suffix}"] = lora_B.clone()
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["c_attn"], "enable_lora": ENABLE, "fan_in_fan_out": True, "merge_weights": False,
        "bias": "none", "inference_mode": True, "base_model_name_or_path": "gpt2"}))
    if binary:
        torch.save(tensors, tmp_path / "adapter_model.bin")
    else:
        save_file(tensors, tmp_path / "adapter_model.safetensors")
    return references


@pytest.mark.parametrize("variant", ["safetensors", "bin-conv1d-B", "loralib-names"])
def test_legacy_fused_file_loads_with_loralib_outputs(tmp_path, variant):
    from tiny_models import tiny_gpt2

    from peftlite import MergedLinear
    references = legacy_adapter(tmp_path, conv_b=variant == "bin-conv1d-B", binary=variant == "bin-conv1d-B",
                                loralib_names=variant == "loralib-names")
    model = LoraModel.from_pretrained(tiny_gpt2(), tmp_path)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    for path, reference in references.items():
        layer = model.base_model.model.get_submodule(path)
        assert isinstance(layer, MergedLinear) and layer.r["default"] == 3
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-4)
    # and it saves as PEFT's plain layout, which PEFT loads with the same outputs
    model.save_pretrained(tmp_path / "resaved")
    tokens = ids(length=6)
    expected = logits(model, tokens)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "resaved"), tokens),
                               expected, atol=1e-5, rtol=1e-4)


def test_current_fused_file_is_not_mistaken_for_legacy(tmp_path):
    """peftlite's own enable_lora file, with g = 1 (the shapes both layouts allow) and g = 2."""
    from tiny_models import tiny_gpt2
    for enable in ([False, True, False], ENABLE):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], enable_lora=enable, init_lora_weights=False)
        model = get_peft_model(tiny_gpt2(), config)
        model.save_pretrained(tmp_path / str(enable))
        loaded = LoraModel.from_pretrained(tiny_gpt2(), tmp_path / str(enable))
        torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()), atol=1e-6, rtol=1e-5)


def test_mixed_fused_layouts_are_refused(tmp_path):
    from safetensors.torch import save_file
    from tiny_models import tiny_gpt2
    legacy_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    name = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[name] = _current_B(tensors[name])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="ambiguous fused layout"):
        LoraModel.from_pretrained(tiny_gpt2(), tmp_path)


def _current_B(legacy_B: torch.Tensor) -> torch.Tensor:
    from peftlite.io.legacy import _to_current
    return _to_current(legacy_B, ENABLE)


# ---- peftlite inspect: does it load in PEFT unchanged? (checked against PEFT itself) ----------------
def inspect_json(directory, capsys) -> dict:
    import json

    from peftlite.app.cli import main
    assert main(["inspect", str(directory)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peft_compatibility"]


def test_inspect_says_whether_peft_loads_it(tmp_path, capsys):
    from tiny_models import tiny_gpt2
    legacy_adapter(tmp_path / "legacy")
    report = inspect_json(tmp_path / "legacy", capsys)
    assert not report["loads_in_peft_unchanged"] and "legacy fused-QKV" in report["blocking"][0]
    with pytest.raises(Exception):  # noqa: B017 - PEFT's own failure, whatever its type
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "legacy")

    LoraModel.from_pretrained(tiny_gpt2(), tmp_path / "legacy").save_pretrained(tmp_path / "resaved")
    report = inspect_json(tmp_path / "resaved", capsys)
    assert report["loads_in_peft_unchanged"] and report["notes"][0].startswith("enable_lora=")
    PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "resaved")

    peft_model = peft_get_peft_model(tiny_gpt2(), PeftLoraConfig(r=2, target_modules=["c_attn"]))
    peft_model.save_pretrained(tmp_path / "plain")
    assert inspect_json(tmp_path / "plain", capsys) == {"loads_in_peft_unchanged": True, "blocking": [], "notes": []}


# ---- nn.MultiheadAttention (LoRA on in_proj and out_proj) ---------------------------------------------
class AttentionModel(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = torch.nn.Linear(16, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0])


MHA_FIELDS = dict(r=2, lora_alpha=3, target_modules=["mha"], init_lora_weights=False)


def attention_input() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))


def test_multihead_attention_matches_peft(tmp_path):
    reference, ours = pair(AttentionModel, MHA_FIELDS)
    assert ({n for n, _ in ours.named_parameters() if "lora_" in n}
            >= {"base_model.model.mha.base_layer.out_proj.lora_A.default.weight", "base_model.model.mha.lora_A.default.weight"})
    x = attention_input()
    with torch.no_grad():
        expected = reference(x)
        assert not torch.allclose(expected, AttentionModel()(x), atol=1e-3)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
    reference.train()
    ours.train()
    grads = []
    for model in (reference, ours):
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    reference.eval()
    ours.eval()
    assert_files_load_both_ways(reference, ours, AttentionModel, lambda model: model(x), expected, tmp_path)
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
        merged = ours.merge_and_unload()
        assert type(merged.mha) is torch.nn.MultiheadAttention and type(merged.mha.out_proj) is not LoraModel
        assert isinstance(merged.mha.out_proj, torch.nn.Linear) and not hasattr(merged.mha.out_proj, "lora_A")
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-4)
        plain = pair(AttentionModel, MHA_FIELDS)[1].unload()
        torch.testing.assert_close(plain(x), AttentionModel()(x), atol=0, rtol=0)


def test_multihead_attention_patterns_reach_out_proj_as_in_peft(tmp_path):
    """A pattern naming the attention module sets out_proj's rank and alpha too; one naming out_proj sets none."""
    fields = {**MHA_FIELDS, "rank_pattern": {"out_proj": 5, "mha": 4}, "alpha_pattern": {"mha.out_proj": 7, "mha": 8}}
    reference, ours = pair(AttentionModel, fields)
    shapes = [{n: tuple(p.shape) for n, p in model.state_dict().items() if "lora_" in n} for model in (reference, ours)]
    assert shapes[1] == shapes[0]
    assert shapes[1]["base_model.model.mha.base_layer.out_proj.lora_A.default.weight"] == (4, 16)
    assert ours.base_model.model.mha.base_layer.out_proj.adapters["default"].scaling == 8 / 4
    x = attention_input()
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-4)
    assert_files_load_both_ways(reference, ours, AttentionModel, lambda model: model(x), expected, tmp_path,
                                same_keys=False)


def test_multihead_attention_refuses_mixed_batches():
    _, ours = pair(AttentionModel, MHA_FIELDS)
    ours.add_adapter("other", LoraConfig(**MHA_FIELDS))
    ours.eval()
    with pytest.raises(ValueError, match="mixed-adapter"):
        ours(attention_input(), adapter_names=["default", "other", "__base__"])


def test_moe_weighted_adapter_is_refused_and_changes_nothing():
    _, ours = pair(tiny_mixtral, moe_fields())
    names = {n for n, _ in ours.named_parameters()}
    for combination in ("linear", "cat", "svd"):
        with pytest.raises(ValueError, match="target_parameters"):
            ours.add_weighted_adapter(["default"], [1.0], "combined", combination_type=combination)
    assert "combined" not in ours.peft_config and {n for n, _ in ours.named_parameters()} == names


def test_moe_hotswap_matches_a_fresh_load(tmp_path):
    for seed, name in ((1, "one"), (2, "two")):
        base = tiny_mixtral()
        torch.manual_seed(seed)  # the factors' random init
        get_peft_model(base, LoraConfig(**moe_fields())).save_pretrained(tmp_path / name)
    fresh = LoraModel.from_pretrained(tiny_mixtral(), tmp_path / "two")
    swapped = LoraModel.from_pretrained(tiny_mixtral(), tmp_path / "one")
    before = logits(swapped, ids())
    swapped.hotswap_adapter(str(tmp_path / "two"), "default")
    assert not torch.allclose(before, logits(fresh, ids()), atol=1e-4)
    torch.testing.assert_close(logits(swapped, ids()), logits(fresh, ids()), atol=1e-6, rtol=1e-5)
