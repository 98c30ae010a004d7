"""One base model, several task adapters: per-request switching and a mixed batch.

A tiny Llama-style model (random weights, built from a config: fully offline)
gets three LoRA adapters, each trained for a few seconds on its own toy task
over the tokens 0..39:

    count: each next token is the last one + 1     3 -> 4 5 6 7 8 9
    skip:  each next token is the last one + 2     3 -> 5 7 9 11 13 15
    down:  each next token is the last one - 1     3 -> 2 1 0 39 38 37

The adapters are saved in PEFT's format, and a "server" loads all of them onto
one copy of the base. It then answers requests two ways: one at a time with
`set_adapter` before each, and all at once in one `generate` whose
`adapter_names` gives each request its adapter ("__base__": no adapter). Both
give the same tokens; the timings are printed.

    .venv/bin/python examples/multi_task.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlite import LoraConfig, LoraModel, get_lora_model

VOCAB = 40
TASKS = {"count": 1, "skip": 2, "down": -1}  # task -> step between consecutive tokens
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> LlamaForCausalLM:
    """The shared base: the same random weights every time it is built."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0, initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def task_batch(step: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) sequences start, start+step, start+2·step, ... (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def train_adapter(step: int, save_to: Path, steps: int = 80) -> float:
    """Train one adapter on its task (the base stays frozen) and save it; returns the final loss."""
    model = get_lora_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(step)
    for _ in range(steps):
        ids = task_batch(step, 16, 12, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(save_to))
    return loss.item()


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    torch.set_num_threads(1)  # tiny ops: one thread is fastest (and steadiest on a shared CPU)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task, step in TASKS.items():
            start = time.perf_counter()
            loss = train_adapter(step, root / task)
            print(f"trained adapter {task!r:8} loss {loss:.3f} in {ms_since(start) / 1e3:.1f} s")

        # The server: one base, every task adapter loaded onto it.
        tasks = list(TASKS)
        start = time.perf_counter()
        model = LoraModel.from_pretrained(base_model(), str(root / tasks[0]), adapter_name=tasks[0])
        for task in tasks[1:]:
            model.load_adapter(str(root / task), adapter_name=task)
        print(f"loaded {len(tasks)} adapters onto one base in {ms_since(start):.1f} ms")
    model.eval()

    requests = [("count", 3), ("down", 3), ("skip", 10), ("__base__", 3), ("count", 37), ("down", 1)]
    prompts = torch.tensor([[start] for _, start in requests])
    generate = dict(max_new_tokens=6, do_sample=False, attention_mask=None)

    # 1. One request at a time, switching the active adapter before each.
    one_by_one, switch_us = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for (task, _), prompt in zip(requests, prompts):
            if task == "__base__":
                with model.disable_adapter():
                    one_by_one.append(model.generate(prompt[None], **generate)[0])
                continue
            t = time.perf_counter()
            model.set_adapter(task)
            switch_us.append(ms_since(t) * 1e3)
            one_by_one.append(model.generate(prompt[None], **generate)[0])
    sequential_ms = ms_since(start)

    # 2. All requests in one batch, each sample with its own adapter.
    start = time.perf_counter()
    with torch.no_grad():
        mixed = model.generate(prompts, adapter_names=[task for task, _ in requests], **generate)
    mixed_ms = ms_since(start)

    print(f"\n{'adapter':10} {'prompt':>6}  generated (mixed batch)")
    for (task, first), row in zip(requests, mixed):
        print(f"{task:10} {first:6}  {' '.join(str(t) for t in row[1:].tolist())}")
    same = all(torch.equal(a, b) for a, b in zip(one_by_one, mixed))
    print(f"\nmixed batch equals one-by-one answers: {same}")
    print(f"set_adapter: median {sorted(switch_us)[len(switch_us) // 2]:.1f} µs")
    print(f"{len(requests)} requests one by one: {sequential_ms:.1f} ms; in one mixed batch: {mixed_ms:.1f} ms "
          f"({sequential_ms / mixed_ms:.1f}x faster)")


if __name__ == "__main__":
    main()
