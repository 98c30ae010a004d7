"""Adapter load time vs a raw read of the same file, peftlite beside PEFT (issue 5's load goal).

A Llama-style base (4 layers, d=512, intermediate 1376, vocab 8192) and K
PEFT-saved adapters (7 targets, r=16). For each adapter in turn, in one
process and interleaved: `safetensors.torch.load_file` of its file, then
peftlite's `load_adapter`, then PEFT's `load_adapter`. Prints medians and
the ratio to the raw read, for the first and the last quarter of the K
loads (the cost must not grow with the number already loaded).

    .venv/bin/python benchmarks/load_adapter.py [--k 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftlite import LoraModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def save_adapters(root: Path, k: int) -> list[Path]:
    model = get_peft_model(base_model(), PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                        init_lora_weights=False))
    paths = []
    for i in range(k):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def timed(fn) -> tuple[float, float]:
    """(wall ms, CPU ms of this process). On a shared, overloaded CPU the wall time mostly measures
    preemption; the CPU time is the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(Path(tmp), args.k)
        lite = LoraModel.from_pretrained(base_model(), str(paths[0]))
        peft = PeftModel.from_pretrained(base_model(), str(paths[0]))
        rows = []
        for i, path in enumerate(paths[1:], start=1):
            raw = timed(lambda: load_file(path / "adapter_model.safetensors"))
            ours = timed(lambda: lite.load_adapter(str(path), f"a{i}"))
            theirs = timed(lambda: peft.load_adapter(str(path), f"a{i}"))
            rows.append((raw, ours, theirs))
    quarter = max(1, len(rows) // 4)
    print(f"load_adapter, Llama-style 4x512, 7 targets r=16, K={args.k}, torch threads={args.threads}")
    for clock, label_clock in ((0, "wall"), (1, "CPU")):
        header = f"{label_clock + ' medians':>20} {'raw ms':>8} {'peftlite ms':>12} {'x raw':>6}"
        print(f"{header} {'PEFT ms':>9} {'x raw':>6}")
        for label, part in (("loads 2..K/4", rows[:quarter]), ("last K/4 loads", rows[-quarter:]), ("all", rows)):
            raw, ours, theirs = (statistics.median(t[clock] for t in col) for col in zip(*part))
            print(f"{label:>20} {raw:8.2f} {ours:12.2f} {ours / raw:6.1f} {theirs:9.2f} {theirs / raw:6.1f}")

if __name__ == "__main__":
    main()
