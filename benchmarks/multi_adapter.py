"""Many adapters on one base, peftlite beside PEFT in one process.

The same K PEFT-saved adapters (Llama-style base: 4 layers, d=512, intermediate
1376, vocab 8192; r=16 on q,k,v,o,gate,up,down) go into a peftlite model and a
PEFT model, and the script prints:

1. load: each adapter's `load_adapter`, interleaved with a raw
   `safetensors.torch.load_file` of the same file; medians and × raw, for the
   first and the last quarter of the loads (the cost must not grow with K);
2. set_adapter latency with K adapters loaded;
3. a batch of B=32, T=64 spread over 32 adapters (`adapter_names`) vs the same
   batch with one adapter active: medians and the mixed/single ratio;
4. memory after loading K: the model's tensor storage (deduplicated) beside
   base + Σ adapter file sizes, and after deleting half of the adapters.

Wall and CPU time (this process) are both printed: on a shared, overloaded CPU
the wall clock mostly measures preemption, the CPU time the work done.
Variants are interleaved in every repetition so load drifts hit all alike.

    .venv/bin/python benchmarks/multi_adapter.py [--k 32] [--reps 11] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
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
    """K different random r=16 adapters, written by PEFT's own save_pretrained."""
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
    """(wall ms, CPU ms of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct storage behind the module's parameters and buffers."""
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def file_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(path / "adapter_model.safetensors").values())


def median(values) -> float:
    return statistics.median(values)


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


# ---- 1. load ------------------------------------------------------------------------------------
def bench_load(paths: list[Path]) -> tuple[LoraModel, PeftModel]:
    lite = LoraModel.from_pretrained(base_model(), str(paths[0]), adapter_name="a0")
    peft = PeftModel.from_pretrained(base_model(), str(paths[0]), adapter_name="a0")
    rows = []
    for i, path in enumerate(paths[1:], start=1):
        raw = timed(lambda: load_file(path / "adapter_model.safetensors"))
        ours = timed(lambda: lite.load_adapter(str(path), f"a{i}"))
        theirs = timed(lambda: peft.load_adapter(str(path), f"a{i}"))
        rows.append((raw, ours, theirs))
    quarter = max(1, len(rows) // 4)
    print(f"\n1. load_adapter (K={len(paths)}; ms, median)")
    print(f"   {'':22} {'raw read':>9} {'peftlite':>9} {'x raw':>6} {'PEFT':>9} {'x raw':>6}")
    for clock, clock_name in ((0, "wall"), (1, "CPU")):
        for label, part in (("loads 2..K/4", rows[:quarter]), ("last K/4 loads", rows[-quarter:])):
            raw, ours, theirs = (median(t[clock] for t in column) for column in zip(*part))
            print(f"   {clock_name + ', ' + label:22} {raw:9.2f} {ours:9.2f} {ours / raw:6.1f} "
                  f"{theirs:9.2f} {theirs / raw:6.1f}")
    return lite, peft


# ---- 4. memory ------------------------------------------------------------------------------------
def bench_memory(lite: LoraModel, peft: PeftModel, paths: list[Path]) -> None:
    base = tensor_bytes(base_model())
    sizes = [file_bytes(path) for path in paths]
    expected = base + sum(sizes)
    print(f"\n4. memory: tensor storage held by the model (base {mib(base).strip()}, "
          f"Σ {len(paths)} adapter files {mib(sum(sizes)).strip()})")
    print(f"   {'':28} {'peftlite':>12} {'PEFT':>12} {'base + Σ files':>15}")
    ours, theirs = tensor_bytes(lite), tensor_bytes(peft)
    print(f"   {'after loading K':28} {mib(ours)} {mib(theirs)} {mib(expected):>15}"
          f"   (x: {ours / expected:.3f} / {theirs / expected:.3f})")
    half = len(paths) // 2
    for i in range(half, len(paths)):  # the active adapter a0 stays
        lite.delete_adapter(f"a{i}")
        peft.delete_adapter(f"a{i}")
    gc.collect()
    expected = base + sum(sizes[:half])
    ours, theirs = tensor_bytes(lite), tensor_bytes(peft)
    print(f"   {'after deleting K/2':28} {mib(ours)} {mib(theirs)} {mib(expected):>15}"
          f"   (x: {ours / expected:.3f} / {theirs / expected:.3f})")


# ---- 2. switch ------------------------------------------------------------------------------------
def bench_switch(lite: LoraModel, peft: PeftModel, names: list[str], rounds: int = 20) -> None:
    """Median time of one set_adapter over `rounds` passes through every adapter, interleaved."""
    ours, theirs = [], []
    for _ in range(rounds):
        for name in names:
            ours.append(timed(lambda: lite.set_adapter(name)))
            theirs.append(timed(lambda: peft.set_adapter(name)))
    print(f"\n2. set_adapter with {len(names)} adapters loaded (ms, median of {len(ours)})")
    print(f"   {'':22} {'peftlite':>9} {'PEFT':>9} {'PEFT/peftlite':>14}")
    for clock, clock_name in ((0, "wall"), (1, "CPU")):
        a, b = median(t[clock] for t in ours), median(t[clock] for t in theirs)
        print(f"   {clock_name:22} {a:9.4f} {b:9.4f} {b / max(a, 1e-6):14.0f}")


# ---- 3. mixed batch -------------------------------------------------------------------------------
def bench_mixed(lite: LoraModel, peft: PeftModel, names: list[str], reps: int, batch: int, length: int) -> None:
    ids = torch.randint(2, 8192, (batch, length), generator=torch.Generator().manual_seed(0))
    per_sample = [names[i % len(names)] for i in range(batch)]
    lite.set_adapter(names[0])
    peft.set_adapter(names[0])
    runs = {
        "peftlite single": lambda: lite(input_ids=ids),
        "peftlite mixed": lambda: lite(input_ids=ids, adapter_names=per_sample),
        "PEFT single": lambda: peft(input_ids=ids),
        "PEFT mixed": lambda: peft(input_ids=ids, adapter_names=per_sample),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run()
        for rep in range(reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(timed(runs[name]))
    print(f"\n3. forward B={batch}, T={length}: one adapter vs {len(set(per_sample))} adapters in the batch "
          f"(ms, median of {reps})")
    print(f"   {'':8} {'peftlite single':>15} {'mixed':>9} {'mixed/single':>13}   "
          f"{'PEFT single':>11} {'mixed':>9} {'mixed/single':>13}")
    for clock, clock_name in ((0, "wall"), (1, "CPU")):
        m = {name: median(t[clock] for t in values) for name, values in times.items()}
        paired = {lib: median(a[clock] / b[clock] for a, b in zip(times[f"{lib} mixed"], times[f"{lib} single"]))
                  for lib in ("peftlite", "PEFT")}
        print(f"   {clock_name:8} {m['peftlite single']:15.1f} {m['peftlite mixed']:9.1f} "
              f"{m['peftlite mixed'] / m['peftlite single']:13.3f}   {m['PEFT single']:11.1f} {m['PEFT mixed']:9.1f} "
              f"{m['PEFT mixed'] / m['PEFT single']:13.3f}")
        print(f"   {'':8} {'(median of per-rep ratios)':>25} {paired['peftlite']:13.3f}   "
              f"{'':21} {paired['PEFT']:13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"multi-adapter benchmark: Llama-style 4 layers, d=512, intermediate 1376, vocab 8192; "
          f"K={args.k} adapters, r=16 on {len(TARGETS)} targets; torch {torch.__version__}, threads={args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(Path(tmp), args.k)
        lite, peft = bench_load(paths)
        names = [f"a{i}" for i in range(args.k)]
        bench_switch(lite, peft, names)
        bench_mixed(lite, peft, names, args.reps, args.batch, args.length)
        bench_memory(lite, peft, paths)


if __name__ == "__main__":
    main()
