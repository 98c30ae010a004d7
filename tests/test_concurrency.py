"""Several threads share one model, each running forward with its own `adapter_names`.

Each thread must get exactly its own result: bit-identical to the same call made alone, and
row by row equal (to float tolerance) to the batch run with that row's adapter set active.
All threads start together at a barrier and run many calls each, so their forwards interleave.

Run: .venv/bin/pytest -q tests/test_concurrency.py
"""

from __future__ import annotations

import threading

import torch
from tiny_models import tiny_bert, tiny_llama, token_batch

from peftlite import LoraConfig, get_lora_model

ADAPTERS = ("a", "b", "c")
CALLS_PER_THREAD = 15


def bert_with_three_adapters():
    """Tiny BERT classifier; each adapter has its own LoRA on query/value and its own classifier copy."""
    config = dict(target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    model = get_lora_model(tiny_bert(), LoraConfig(**config), adapter_name="a")
    for seed, name in enumerate(ADAPTERS[1:], start=1):
        model.add_adapter(name, LoraConfig(r=4 * seed, **config))
    with torch.no_grad():  # make each classifier copy differ from the original and from each other
        for seed, name in enumerate(ADAPTERS):
            copy = model.base_model.classifier.modules_to_save[name]
            copy.weight.add_(torch.randn(copy.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def row_reference(model, ids, name):
    """The whole batch with one adapter active (or none for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return model(ids).logits
    model.set_adapter(name)
    return model(ids).logits


def run_in_threads(jobs):
    """Run each zero-argument job CALLS_PER_THREAD times in its own thread, all released together."""
    barrier = threading.Barrier(len(jobs))
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def work(i):
        try:
            barrier.wait()
            for _ in range(CALLS_PER_THREAD):
                results[i].append(jobs[i]())
        except BaseException as err:  # re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@torch.no_grad()
def test_threads_with_different_adapter_names_each_get_their_own_result():
    model = bert_with_three_adapters()
    ids = token_batch(batch=4, length=6)
    requests = [
        ["a", "b", "c", "__base__"],
        ["c", "c", "a", "a"],
        ["__base__", "a", "__base__", "b"],
        ["b", "b", "b", "b"],
        None,  # a plain forward with the active adapter, "a", at the same time
    ]
    model.set_adapter("a")
    alone = [model(ids, adapter_names=names).logits for names in requests]
    # Independent check: row j of a mixed batch equals row j of the batch run with adapter names[j] active.
    references = {name: row_reference(model, ids, name) for name in (*ADAPTERS, "__base__")}
    model.set_adapter("a")
    for names, out in zip(requests, alone):
        for row, name in enumerate(names or ["a"] * len(ids)):
            torch.testing.assert_close(out[row], references[name][row], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(references["a"], references["b"])  # the adapters really differ

    jobs = [lambda names=names: model(ids, adapter_names=names).logits for names in requests]
    results = run_in_threads(jobs)
    for names, expected, outs in zip(requests, alone, results):
        assert len(outs) == CALLS_PER_THREAD
        for out in outs:
            assert torch.equal(out, expected), f"thread with adapter_names={names} got another thread's result"


@torch.no_grad()
def test_threads_generating_with_different_adapters():
    """generate keeps the routing for all its steps, per thread."""
    config = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_alpha=64)
    model = get_lora_model(tiny_llama(), LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", LoraConfig(**config))
    model.eval()
    ids = token_batch(batch=2, length=5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=1)
    requests = [["a", "b"], ["b", "__base__"], ["__base__", "a"]]
    alone = [model.generate(ids, adapter_names=names, **kwargs) for names in requests]
    assert not torch.equal(alone[0][0], alone[1][0]) and not torch.equal(alone[1][0], alone[2][0])  # they differ
    jobs = [lambda names=names: model.generate(ids, adapter_names=names, **kwargs) for names in requests]
    for names, expected, outs in zip(requests, alone, run_in_threads(jobs)):
        for out in outs:
            assert torch.equal(out, expected), f"generate with adapter_names={names} got another thread's tokens"
