"""QLoRA: LoRA over bitsandbytes 4-bit (nf4/fp4) and 8-bit bases on CPU, against real PEFT.

Tiny Llama and GPT-2 configs, loaded through transformers' BitsAndBytesConfig with
device_map="cpu". Hidden sizes are 64: bitsandbytes' CPU kernels want the input size a
multiple of its block size (64). Models are compared in train mode with dropout 0 unless a
test says otherwise: in eval mode bitsandbytes repacks 4-bit weights for its CPU inference
kernel on the first forward, which PEFT and peftlite then share anyway.

Run: .venv/bin/python -m pytest -q tests/test_qlora.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from accelerate import Accelerator  # noqa: E402
from tiny_models import tiny_word_tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import peftlite  # noqa: E402
from peftlite import dequantize_and_merge, prepare_model_for_kbit_training  # noqa: E402
from peftlite.app.cli import main  # noqa: E402
from peftlite.fast import linear as fast_linear  # noqa: E402
from peftlite.fast import masks as fast_masks  # noqa: E402
from peftlite.integrations import LoraTrainer  # noqa: E402

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-bf16-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16,
                        bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
CLI_QUANT = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)  # --load-in-4bit
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
CONFIG = dict(r=4, lora_alpha=8, init_lora_weights=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Float checkpoints of the tiny models on disk, by architecture."""
    root = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))
    paths = {}
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    return paths


def load(path: str, quant: str | dict | None) -> nn.Module:
    """The model at `path`, quantized as QUANTS[quant] (or as the dict `quant`), or in float for None."""
    settings = QUANTS[quant] if isinstance(quant, str) else quant
    kwargs = {} if settings is None else {"quantization_config": BitsAndBytesConfig(**settings),
                                          "device_map": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(2, 128, (batch, 8), generator=torch.Generator().manual_seed(seed))


def pair(saved: dict[str, str], arch: str, quant: str, **extra) -> tuple[nn.Module, nn.Module]:
    """PEFT and peftlite on two loads of the same quantized model, with the same adapter weights."""
    config = dict(CONFIG, target_modules=TARGETS[arch], **extra)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(saved[arch], quant), peft.LoraConfig(**config))
    ours = peftlite.get_peft_model(load(saved[arch], quant), peftlite.LoraConfig(**config))
    peftlite.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def packed_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's packed weight and quantization statistics, copied."""
    out = {}
    for path, module in model.named_modules():
        if type(module) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt):
            out[path] = module.weight.data.clone()
            state = getattr(module.weight, "quant_state", None)
            scales = state.absmax if state is not None else (module.state.SCB if module.state.SCB is not None
                                                             else module.weight.SCB)
            out[path + ".scales"] = scales.clone()
    return out


def assert_same_bytes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys() and before
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def logits(model: nn.Module, batch: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, **kwargs).logits


# ---- layers, forward, training -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_outputs_grads_match_peft_and_packed_weights_never_change(saved, arch, quant):
    theirs, ours = pair(saved, arch, quant)
    layers = [m for m in ours.modules() if isinstance(m, peftlite.LoraLayer)]
    assert layers and all(type(m).__name__ == "QuantizedLinear" for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)  # PEFT's adapter dtype
    theirs.train()
    ours.train()
    before = packed_bytes(ours)
    batch = ids()
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)
    grads = []
    for model in (theirs, ours):
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        ours(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    assert_same_bytes(before, packed_bytes(ours))


def test_rslora_dropout_and_rank_pattern_as_peft(saved):
    theirs, ours = pair(saved, "llama", "nf4", use_rslora=True, rank_pattern={"down_proj": 2},
                        alpha_pattern={"q_proj": 3})
    theirs.train()
    ours.train()
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), rtol=0, atol=0)
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(8 / 2 ** 0.5)
    dropped = peftlite.get_peft_model(load(saved["llama"], "nf4"),
                                      peftlite.LoraConfig(**CONFIG, target_modules=["q_proj"], lora_dropout=0.5))
    dropped.train()
    assert not torch.equal(logits(dropped, ids()), logits(dropped, ids()))  # dropout runs on the LoRA input


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quant", ["nf4", "fp4-double"])
def test_4bit_training_runs_one_fused_node_held_to_the_reference(saved, fold, dropout, quant, monkeypatch):
    """Over a 4-bit base the fused node dequantizes W itself; output and gradients equal bitsandbytes' own
    layer plus the textbook term, with the same dropout mask. 8-bit and inference keep the reference."""
    monkeypatch.setattr(fast_linear, "folding_pays", lambda *sizes: fold)
    settings = QUANTS["nf4"] if quant == "nf4" else dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                         bnb_4bit_use_double_quant=True)
    model = peftlite.get_peft_model(load(saved["llama"], settings),
                                    peftlite.LoraConfig(**CONFIG, target_modules=TARGETS["llama"], lora_dropout=dropout))
    model.train().use_fast_path(True)  # this test is about the fused node, whatever PEFTLITE_FAST_PATH says
    before = packed_bytes(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    (A, B), s = layer.factors("default"), layer.scaling["default"]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [x, A, B])
    torch.manual_seed(3)
    dropped = x * fast_masks.draw_dropout_mask(x, dropout) / (1 - dropout) if dropout else x
    reference = layer.base_layer(x) + F.linear(F.linear(dropped, A), B) * s
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    for got, expected in zip(grads, torch.autograd.grad((reference * weight).sum(), [x, A, B])):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert_same_bytes(before, packed_bytes(model))
    with torch.no_grad():  # inference: bitsandbytes' own kernel plus the term
        assert layer(x).grad_fn is None
    int8 = peftlite.get_peft_model(load(saved["llama"], "int8"), peftlite.LoraConfig(**CONFIG, target_modules=["q_proj"]))
    q_proj = int8.base_model.model.model.layers[0].self_attn.q_proj
    assert "LoraLinearFunction" not in type(q_proj(torch.randn(2, 64, requires_grad=True)).grad_fn).__name__


def test_modules_to_save_and_all_linear_over_4bit(saved):
    config = dict(CONFIG, target_modules="all-linear", modules_to_save=["lm_head"])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(saved["llama"], "nf4"), peft.LoraConfig(**config))
    ours = peftlite.get_peft_model(load(saved["llama"], "nf4"), peftlite.LoraConfig(**config))
    assert sorted(ours.base_model.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)
    peftlite.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    theirs.train()
    ours.train()
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), rtol=0, atol=0)


# ---- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_files_load_both_ways_and_on_the_float_base(saved, arch, quant, tmp_path):
    """GPT-2: transformers quantizes its Conv1D layers into (out, in) Linear4bit/8bitLt; on the float base
    the same A and B serve the Conv1D (fan_in_fan_out), in PEFT and in peftlite."""
    theirs, ours = pair(saved, arch, quant)
    for model in (theirs, ours):
        model.train()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    batch = ids()
    reference = logits(theirs, batch)
    ours_from_peft = peftlite.PeftModel.from_pretrained(load(saved[arch], quant), str(tmp_path / "peft")).train()
    peft_from_ours = peft.PeftModel.from_pretrained(load(saved[arch], quant), str(tmp_path / "ours")).train()
    torch.testing.assert_close(logits(ours_from_peft, batch), reference, rtol=0, atol=0)
    torch.testing.assert_close(logits(peft_from_ours, batch), reference, rtol=0, atol=0)
    # either file on the float base: the same outputs in PEFT and peftlite
    float_ours = peftlite.PeftModel.from_pretrained(load(saved[arch], None), str(tmp_path / "peft"))
    float_peft = peft.PeftModel.from_pretrained(load(saved[arch], None), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(float_ours.eval(), batch), logits(float_peft.eval(), batch))


# ---- merging -------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", list(QUANTS))
def test_merge_requantizes_no_worse_than_peft_and_unmerge_restores_bytes(saved, quant):
    theirs, ours = pair(saved, "llama", quant)
    for model in (theirs, ours):
        model.train()
    batch = ids()
    exact = logits(ours, batch)  # the unmerged adapter: what a perfect merge would give
    before = packed_bytes(ours)
    weight_objects = [m.base_layer.weight for m in ours.modules() if isinstance(m, peftlite.LoraLayer)]
    with pytest.warns(UserWarning, match="requantizes"):
        ours.merge_adapter()
    assert not torch.equal(packed_bytes(ours)[next(iter(before))], next(iter(before.values())))
    merged = logits(ours, batch)
    ours.unmerge_adapter()
    assert_same_bytes(before, packed_bytes(ours))
    assert [m.base_layer.weight for m in ours.modules() if isinstance(m, peftlite.LoraLayer)] == weight_objects
    torch.testing.assert_close(logits(ours, batch), exact, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = logits(theirs.merge_and_unload().train(), batch)
        ours_unloaded = ours.merge_and_unload()
    torch.testing.assert_close(logits(ours_unloaded.train(), batch), merged, rtol=0, atol=0)
    ours_error, peft_error = (merged - exact).abs().max(), (peft_merged - exact).abs().max()
    assert ours_error <= peft_error * 1.05 + 1e-6, (ours_error, peft_error)
    assert not any(isinstance(m, peftlite.LoraLayer) for m in ours_unloaded.modules())


def test_safe_merge_refuses_nan_and_changes_nothing(saved):
    _, ours = pair(saved, "llama", "nf4")
    ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data[0, 0] = float("nan")
    before = packed_bytes(ours)
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert_same_bytes(before, packed_bytes(ours))
    assert not ours.base_model.merged_adapters()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dequantize_and_merge_gives_a_float_model_that_saves(saved, quant, tmp_path):
    _, ours = pair(saved, "llama", quant)
    ours.train()
    batch = ids()
    exact = logits(ours, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        requantized = logits(pair(saved, "llama", quant)[1].train().merge_and_unload().train(), batch)
    plain = dequantize_and_merge(ours)
    quantized = [m for m in plain.modules() if type(m) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)]
    assert not quantized and not any(isinstance(m, peftlite.LoraLayer) for m in plain.modules())
    dense = logits(plain.train(), batch)
    assert (dense - exact).abs().max() < (requantized - exact).abs().max()
    plain.save_pretrained(tmp_path / "merged")
    reloaded = load(str(tmp_path / "merged"), None)
    assert getattr(reloaded.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(reloaded.train(), batch), dense)


# ---- serving -------------------------------------------------------------------------------------
def test_adapters_switch_mix_and_hotswap_over_4bit(saved, tmp_path):
    base_ids = ids(batch=3)
    models = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = peftlite.get_peft_model(load(saved["llama"], "nf4"),
                                        peftlite.LoraConfig(**CONFIG, target_modules=TARGETS["llama"]))
        model.save_pretrained(tmp_path / name)
        models[name] = model
    server = peftlite.PeftModel.from_pretrained(load(saved["llama"], "nf4"), str(tmp_path / "a"), adapter_name="a")
    server.load_adapter(str(tmp_path / "b"), adapter_name="b")
    server.eval()
    single = {}
    for name in ("a", "b"):
        server.set_adapter(name)
        single[name] = logits(server, base_ids)
    with server.disable_adapter():
        single["__base__"] = logits(server, base_ids)
    assert not torch.equal(single["a"], single["b"])
    mixed = logits(server, base_ids, adapter_names=["a", "__base__", "b"])
    for row, name in enumerate(["a", "__base__", "b"]):
        torch.testing.assert_close(mixed[row], single[name][row])
    server.set_adapter("a")
    server.hotswap_adapter(str(tmp_path / "b"), "a")
    torch.testing.assert_close(logits(server, base_ids), single["b"])


# ---- errors and preparation ----------------------------------------------------------------------
class CustomLinear(nn.Linear):
    """A subclass of nn.Linear peftlite does not know: never treated as a float Linear."""


class Custom4bit(bnb.nn.Linear4bit):
    pass


@pytest.mark.parametrize("cls", [CustomLinear, Custom4bit])
def test_unknown_linear_subclass_gets_one_clear_error(cls):
    model = nn.Sequential(nn.Linear(64, 64), cls(64, 64))
    with pytest.raises(ValueError, match=rf"'1'.*{cls.__name__}.*Linear4bit"):
        peftlite.get_peft_model(model, peftlite.LoraConfig(target_modules=["0", "1"]))
    assert type(model[0]) is nn.Linear and type(model[1]) is cls


@pytest.mark.parametrize("checkpointing", [True, False])
def test_prepare_model_for_kbit_training_as_peft(saved, checkpointing):
    prepared = []
    for prepare in (peft.prepare_model_for_kbit_training, prepare_model_for_kbit_training):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                saved["llama"], dtype=torch.bfloat16, device_map="cpu",
                quantization_config=BitsAndBytesConfig(**QUANTS["nf4"]))
        prepared.append(prepare(model, use_gradient_checkpointing=checkpointing))
    theirs, ours = prepared
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == \
        {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.model.norm.weight.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.float32
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing == checkpointing
    lora = peftlite.get_peft_model(ours, peftlite.LoraConfig(**CONFIG, target_modules=TARGETS["llama"])).train()
    lora(input_ids=ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)


def test_training_after_an_eval_forward_reaches_every_layer_once_prepared(saved):
    """bitsandbytes repacks 4-bit weights on a CPU eval forward; prepare_model_for_kbit_training undoes it."""
    model = load(saved["llama"], "nf4").eval()
    logits(model, ids())
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peftlite.get_peft_model(model, peftlite.LoraConfig(**CONFIG, target_modules=TARGETS["llama"])).train()
    lora(input_ids=ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)


# ---- command line --------------------------------------------------------------------------------
def test_cli_trains_evaluates_and_merges_over_a_4bit_base(saved, tmp_path, monkeypatch, capsys):
    """`--load-in-4bit`: the adapter trains on the 4-bit base, loads in PEFT, merges into a float model."""
    words = [f"w{i}" for i in range(100)]
    tiny_word_tokenizer(words).save_pretrained(saved["llama"])
    (tmp_path / "lm.txt").write_text("\n".join(" ".join(words[i:i + 6]) for i in range(0, 60, 3)) + "\n")
    monkeypatch.chdir(tmp_path)
    common = ["--model", saved["llama"], "--task", "causal-lm", "--load-in-4bit"]
    assert main(["train", *common, "--data", "lm.txt", "--output", "adapter", "--batch-size", "4",
                 "--target-modules", "q_proj,v_proj", "--lr", "1e-2", "--lora-dropout", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] > 0
    assert main(["eval", *common, "--data", "lm.txt", "--adapter", "adapter"]) == 0
    perplexity = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert perplexity > 1
    trained = peft.PeftModel.from_pretrained(load(saved["llama"], CLI_QUANT), "adapter").train()
    assert main(["merge", "--model", saved["llama"], "--adapter", "adapter", "--output", "merged",
                 "--load-in-4bit"]) == 0
    merged = load(str(tmp_path / "merged"), None).train()
    assert not any(type(m) is bnb.nn.Linear4bit for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids()), logits(trained, ids()), rtol=1e-4, atol=1e-4)


def test_merging_two_adapters_one_by_one_rounds_once(saved):
    """PEFT requantizes after each adapter; peftlite requantizes W + ΔW_a + ΔW_b from the loaded bytes."""
    models = []
    for library in (peft, peftlite):
        torch.manual_seed(0)
        model = library.get_peft_model(load(saved["llama"], "nf4"),
                                       library.LoraConfig(**CONFIG, target_modules=TARGETS["llama"]))
        model.add_adapter("b", library.LoraConfig(**CONFIG, target_modules=TARGETS["llama"]))
        models.append(model.train())
    theirs, ours = models
    peftlite.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    peftlite.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name="b"),
                                       adapter_name="b")
    batch = ids()
    for model in models:
        model.base_model.set_adapter(["default", "b"])
    exact = logits(ours, batch)
    torch.testing.assert_close(logits(theirs, batch), exact, rtol=0, atol=0)
    before = packed_bytes(ours)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in models:
            model.merge_adapter(["default"])
            model.merge_adapter(["b"])
            errors.append((logits(model, batch) - exact).abs().max())
    assert errors[1] <= errors[0] * 1.05, errors
    ours.unmerge_adapter()
    assert_same_bytes(before, packed_bytes(ours))


def test_lora_trainer_trains_over_a_4bit_base(saved, tmp_path):
    """transformers' Trainer refuses a quantized model without adapters; a LoraModel says it has them."""
    base = prepare_model_for_kbit_training(load(saved["llama"], "nf4"), use_gradient_checkpointing=False)
    model = peftlite.get_peft_model(base, peftlite.LoraConfig(r=4, target_modules=TARGETS["llama"],
                                                              task_type="CAUSAL_LM"))
    before = packed_bytes(model)
    lora_B = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=2, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    data = [{"input_ids": row, "labels": row} for row in ids(batch=8)]
    LoraTrainer(model=model, args=args, train_dataset=data).train()
    assert lora_B.abs().sum() > 0  # B starts at zero: the adapter trained
    assert_same_bytes(before, packed_bytes(model))


def test_accelerate_trains_over_a_4bit_base(saved):
    """A plain accelerate loop (Accelerator.prepare, accelerator.backward) trains the adapter, not the packed base."""
    base = prepare_model_for_kbit_training(load(saved["llama"], "nf4"), use_gradient_checkpointing=False)
    model = peftlite.get_peft_model(base, peftlite.LoraConfig(r=4, target_modules=TARGETS["llama"],
                                                              task_type="CAUSAL_LM"))
    before = packed_bytes(model)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batch = ids(batch=8)
    losses = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert_same_bytes(before, packed_bytes(accelerator.unwrap_model(model)))
