"""Many adapters on one base: mixed-adapter batches, switching and deleting.

A mixed batch is checked against the written-out meaning of `adapter_names`:
sample i of `model(x, adapter_names=names)` equals sample i of the same model
run on that sample alone with adapter names[i] active ("__base__": adapters
disabled), and equals PEFT's own mixed batch on the same weights.

Run: .venv/bin/pytest -x -q tests/test_multi_adapter.py
"""

from __future__ import annotations

import gc
import threading
import weakref

import peft
import pytest
import torch
from tiny_models import (
    LLAMA_TARGETS,
    MLP,
    ConvNet,
    copy_lora_to_peft,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from torch import nn

from peftlite import LoraConfig, get_lora_model
from peftlite.layers import active_routing

NAMES = ["a", "b", "__base__", "a", "c"]  # "a" twice and apart: the scattered-rows path too
ATOL = 1e-5


def with_adapters(model: nn.Module, configs: dict[str, dict]):
    """Wrap `model` with one adapter per entry (random A and B, so every adapter changes outputs)."""
    seeded = iter(configs.items())
    name, config = next(seeded)
    torch.manual_seed(1)
    lora = get_lora_model(model, LoraConfig(init_lora_weights=False, **config), adapter_name=name)
    for seed, (name, config) in enumerate(seeded, start=2):
        torch.manual_seed(seed)
        lora.add_adapter(name, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # saved modules start as copies of the original: make each one differ
        for _, module in lora.saved_modules():
            for copy in module.modules_to_save.values():
                for param in copy.parameters():
                    param.add_(torch.randn_like(param) * 0.5)
    return lora.eval()


def tokens(batch: int) -> tuple[torch.Tensor, ...]:
    return (token_batch(batch, 8),)


def image_and_ids(batch: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 4, 4, generator=generator), torch.randint(0, 16, (batch, 5), generator=generator)


def as_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


# name -> (model factory, {adapter: config}, inputs(batch)) ; each reaches one kind of layer
CASES = {
    "linear-same-rank": (tiny_llama, {n: dict(r=4, lora_alpha=alpha, target_modules=LLAMA_TARGETS)
                                      for n, alpha in zip("abc", (8, 3, 8))}, tokens),
    "linear-ranks-and-targets-differ": (tiny_llama, {
        "a": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.3),  # no dropout in eval
        "b": dict(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
        "c": dict(r=2, lora_alpha=2, target_modules=["v_proj"], use_rslora=True),
    }, tokens),
    "conv1d": (tiny_gpt2, {n: dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"]) for n in "abc"}, tokens),
    "merged-linear": (tiny_gpt2, {n: dict(r=2 + i, target_modules=["c_attn"], enable_lora=[True, False, True])
                                  for i, n in enumerate("abc")}, tokens),
    "embedding-conv2d": (ConvNet, {n: dict(r=3, target_modules=["emb", "conv", "head"]) for n in "abc"},
                         image_and_ids),
    "modules-to-save": (tiny_bert, {n: dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
                                    for n in "abc"}, tokens),
}


def alone(model, inputs: tuple[torch.Tensor, ...], names: list[str]) -> list[torch.Tensor]:
    """Each sample run on its own with its adapter active: the meaning of adapter_names."""
    rows = []
    for i, name in enumerate(names):
        sample = tuple(x[i:i + 1] for x in inputs)
        if name == "__base__":
            with model.disable_adapter():
                rows.append(as_tensor(model(*sample))[0])
        else:
            model.set_adapter(name)
            rows.append(as_tensor(model(*sample))[0])
    return rows


@pytest.mark.parametrize("case", CASES)
def test_each_sample_equals_running_it_alone_with_its_adapter(case):
    factory, configs, make_inputs = CASES[case]
    model = with_adapters(factory(), configs)
    inputs = make_inputs(len(NAMES))
    with torch.no_grad():
        mixed = as_tensor(model(*inputs, adapter_names=NAMES))
        expected = alone(model, inputs, NAMES)
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[i], expected[i], atol=ATOL, rtol=0, msg=f"sample {i} ({name})")
        assert not torch.allclose(expected[0], expected[1], atol=1e-3), "adapters a and b should differ"


def test_mixed_batch_equals_peft_mixed_batch():
    # names that are not substrings of PEFT's "lora_" prefix (PEFT warns about those)
    configs = {"p1": dict(r=4, lora_alpha=8), "p2": dict(r=8, lora_alpha=16), "p3": dict(r=4, lora_alpha=4)}
    lite = with_adapters(tiny_llama(), {n: dict(target_modules=LLAMA_TARGETS, **c) for n, c in configs.items()})
    reference = None
    for name, config in configs.items():
        peft_config = peft.LoraConfig(target_modules=LLAMA_TARGETS, **config)
        if reference is None:
            reference = peft.get_peft_model(tiny_llama(), peft_config, adapter_name=name)
        else:
            reference.add_adapter(name, peft_config)
        copy_lora_to_peft(lite, reference, name)
    reference.eval()
    ids = token_batch(len(NAMES), 8)
    with torch.no_grad():
        names = ["p1", "p2", "__base__", "p1", "p3"]
        torch.testing.assert_close(lite(ids, adapter_names=names).logits,
                                   reference(ids, adapter_names=names).logits, atol=ATOL, rtol=0)


def test_a_model_wrapped_in_eval_mode_takes_mixed_batches_without_dropout():
    """get_lora_model keeps the base's eval mode, so adapters (lora_dropout=0.5) run deterministically."""
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"],
                                                    init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_dropout=0.5, target_modules=["v_proj"], init_lora_weights=False))
    ids = token_batch(3, 8)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["b", "a", "b"]).logits
        for i, name in enumerate(["b", "a", "b"]):
            model.set_adapter(name)
            torch.testing.assert_close(mixed[i], model(ids[i:i + 1]).logits[0], atol=ATOL, rtol=0)


def test_all_samples_on_one_adapter_equals_the_single_adapter_path():
    model = with_adapters(tiny_llama(), {n: dict(r=4, target_modules=LLAMA_TARGETS) for n in "ab"})
    ids = token_batch(4, 8)
    model.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=["b"] * 4).logits, model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("expand", [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
                         ids=["greedy", "beams", "beams+return-sequences"])
def test_generate_each_sample_equals_generating_it_alone(expand):
    """Beam search and num_return_sequences expand each sample's rows: they keep the sample's adapter."""
    model = with_adapters(tiny_llama(), {n: dict(r=4, target_modules=LLAMA_TARGETS) for n in "abc"})
    names = ["c", "__base__", "a", "c"]
    ids = token_batch(len(names), 6)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, **expand)
    per_sample = expand.get("num_return_sequences", 1)
    with torch.no_grad():
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            context = model.disable_adapter() if name == "__base__" else _active(model, name)
            with context:
                single = model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs)
            assert torch.equal(mixed[i * per_sample:(i + 1) * per_sample], single), f"sample {i} ({name})"


class _active:
    """`with _active(model, name)`: set_adapter for the block."""

    def __init__(self, model, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        return False


# ---- errors: raised before anything runs, the model left as it was --------------------------------
def _mlp_model():
    return with_adapters(MLP(), {n: dict(r=2, target_modules=["lin0", "lin1"]) for n in "ab"})


X = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("names,error,words", [
    (["a", "nope", "b"], ValueError, ["'nope'", "unknown adapter", "'a'", "'b'"]),
    (["a", "", "b"], ValueError, ["''", "unknown adapter"]),
    (["a", "b"], ValueError, ["2 entries", "3 samples"]),
    (["a", "b", "a", "b"], ValueError, ["4 entries", "3 samples"]),
    ([], ValueError, ["empty"]),
    ("abc", ValueError, ["adapter_names='abc'", "list of adapter names"]),
    ({"a": 1}, ValueError, ["list of adapter names"]),
    (["a", 3, "b"], ValueError, ["entry 3", "string"]),
], ids=repr)
def test_bad_adapter_names_raise_and_change_nothing(names, error, words):
    model = _mlp_model()
    model.set_adapter("b")
    before = model(X)
    with pytest.raises(error) as info:
        model(X, adapter_names=names)
    message = str(info.value)
    assert all(word in message for word in words), message
    assert active_routing(model.adapter_state) is None
    assert model.active_adapter == "b"
    assert torch.equal(model(X), before)


def test_training_mode_and_merged_weights_raise():
    model = _mlp_model()
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(X, adapter_names=["a", "b", "a"])
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(X, adapter_names=["a", "b", "a"])
    with pytest.raises(ValueError, match="merged"):
        model.generate(X, adapter_names=["a", "b", "a"])
    model.unmerge_adapter()
    assert model(X, adapter_names=["a", "b", "a"]).shape == (3, 2)


def test_routing_is_gone_after_the_call_even_when_it_fails():
    model = _mlp_model()
    with pytest.raises(RuntimeError):  # a shape error inside forward, after routing was set
        model(torch.randn(3, 7), adapter_names=["a", "b", "a"])
    assert active_routing(model.adapter_state) is None
    model.set_adapter("a")
    with model.disable_adapter():
        base = model(X)
    with model.disable_adapter():  # disable_adapter wins over adapter_names, as in PEFT
        assert torch.equal(model(X, adapter_names=["a", "b", "a"]), base)


def test_another_model_inside_the_call_is_not_routed():
    """The routing is keyed by the model's AdapterState: a second LoRA model runs its own active adapter."""
    outer, inner = _mlp_model(), _mlp_model()
    inner.set_adapter("b")
    expected_inner = inner(X)
    seen = []
    outer.base_model.lin1.register_forward_hook(lambda *_: seen.append(inner(X)))
    outer(X, adapter_names=["a", "__base__", "b"])
    assert torch.equal(seen[0], expected_inner)


# ---- threads -------------------------------------------------------------------------------------
def test_concurrent_forwards_with_different_adapter_names_get_their_own_results():
    model = with_adapters(tiny_llama(), {n: dict(r=4, target_modules=LLAMA_TARGETS) for n in "abc"})
    ids = token_batch(4, 8)
    requests = [["a", "b", "c", "__base__"], ["c", "c", "a", "a"], ["__base__"] * 4, ["b", "a", "b", "c"]]
    with torch.no_grad():
        expected = [model(ids, adapter_names=names).logits for names in requests]
        model.set_adapter("b")
        expected.append(model(ids).logits)  # a plain forward in between must not see any routing
    barrier = threading.Barrier(len(expected))
    failures: list[str] = []

    def worker(index: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(6):
                if index < len(requests):
                    out = model(ids, adapter_names=requests[index]).logits
                else:
                    out = model(ids).logits
                if not torch.equal(out, expected[index]):
                    failures.append(f"thread {index} got another call's result")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(expected))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


# ---- switching and deleting --------------------------------------------------------------------------
def test_set_adapter_walks_no_modules(monkeypatch):
    """O(1) switching: with 32 adapters loaded, set_adapter visits no module (one assignment)."""
    model = with_adapters(tiny_llama(), {f"t{i}": dict(r=2, target_modules=["q_proj", "v_proj"]) for i in range(32)})
    ids = token_batch(2, 8)
    visits = []
    monkeypatch.setattr(nn.Module, "named_modules", lambda *a, **k: visits.append(1) or iter(()))
    monkeypatch.setattr(nn.Module, "modules", lambda *a, **k: visits.append(1) or iter(()))
    monkeypatch.setattr(nn.Module, "children", lambda *a, **k: visits.append(1) or iter(()))
    for i in (31, 0, 17):
        model.set_adapter(f"t{i}")
    assert visits == []
    monkeypatch.undo()
    with torch.no_grad():
        mixed = model(ids, adapter_names=["t17", "t17"]).logits
        torch.testing.assert_close(model(ids).logits, mixed, atol=ATOL, rtol=0)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_delete_adapter_frees_its_tensors_and_never_leaves_a_dangling_active_adapter():
    configs = {n: dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]) for n in "abc"}
    model = with_adapters(tiny_bert(), configs)
    model.set_adapter("b")
    ids = token_batch(2, 8)
    own = {id(p): p for _, layer in model.lora_layers() for p in layer.adapter_parameters("b")}
    own.update({id(p): p for _, m in model.saved_modules() for p in m.modules_to_save["b"].parameters()})
    expected_bytes = _param_bytes(model) - sum(p.numel() * p.element_size() for p in own.values())
    refs = [weakref.ref(p) for p in own.values()]
    del own

    model.delete_adapter("b")
    gc.collect()
    assert _param_bytes(model) == expected_bytes
    assert all(ref() is None for ref in refs), "a deleted adapter's tensor is still alive"
    assert model.active_adapter in {"a", "c"}
    with torch.no_grad():
        after = model(ids).logits
        model.set_adapter(model.active_adapter)
        torch.testing.assert_close(after, model(ids).logits)
    with pytest.raises(ValueError, match="'b'"):
        model(ids, adapter_names=["b", "a"])

    for name in ("a", "c"):
        model.delete_adapter(name)
    assert model.active_adapter is None
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base)
        torch.testing.assert_close(model(ids, adapter_names=["__base__"] * 2).logits, base)
