"""Wrapping a model and loading an adapter: peftlite beside PEFT in one process.

The model: a Llama-shaped causal LM (default 32 layers, d=2048, intermediate 5632, 16 heads,
vocab 32000, untied embeddings: 1.78B parameters, fp32), built on the meta device and given
uninitialised CPU storage with `to_empty` (the base values are garbage: nothing here reads
them). LoRA r=16 on "all-linear".

Rows, each on a fresh model (built outside the timing, freed after):
1. wrap: `get_peft_model(model, LoraConfig(...))`, with and without `low_cpu_mem_usage=True`;
2. load: `PeftModel.from_pretrained(model, adapter_dir)`, with and without `low_cpu_mem_usage=True`,
   of one adapter saved once by peftlite (PEFT reads it: it is PEFT's format);
3. floors: `safetensors.torch.load_file` of that adapter file ("raw read"); as it returns
   tensors backed by a lazy mmap of the file, which reads none of the bytes, also
   `safetensors.torch.load(path.read_bytes())` ("full read": every byte in process memory), and,
   for a wrap, allocating and initialising the adapter's tensors as LoRA does by default
   (uniform A, zero B: "init").
Every repetition runs all rows, alternating which library goes first, after one untimed
warm-up round. Figures are medians [min-max]; ratios are of the medians, with the median of the
per-repetition ratios in parentheses. Goals: peftlite wrap / PEFT wrap <= 0.1, peftlite load /
raw read <= 3. The other floors say how much of a row's time any library must spend reading
the bytes or writing fresh memory.

Then, per library, `low_cpu_mem_usage=True` on a base left on the meta device: does wrapping
and loading work, do the base weights stay on meta, and do the LoRA weights equal the file's.
A call that raises is reported as "error: ..." and the script goes on.

    .venv/bin/python benchmarks/wrap_and_load.py                                  # full size, 5 reps
    .venv/bin/python benchmarks/wrap_and_load.py --layers 4 --hidden 512 --reps 2  # quick check
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import load, load_file
from transformers import LlamaConfig, LlamaForCausalLM

import peftlite

LIBS = {"peftlite": peftlite, "PEFT": peft}
ROWS = ["wrap", "wrap, low_cpu_mem_usage", "load", "load, low_cpu_mem_usage"]
FILE = "adapter_model.safetensors"


def build(layers: int, hidden: int, materialise: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to_empty(device="cpu") if materialise else model


def lora_config(lib, **kwargs):
    return lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", **kwargs)


def run_row(lib, row: str, model, adapter_dir: Path):
    low_cpu = row.endswith("low_cpu_mem_usage")
    if row.startswith("wrap"):
        return lib.get_peft_model(model, lora_config(lib), low_cpu_mem_usage=low_cpu)
    return lib.PeftModel.from_pretrained(model, str(adapter_dir), low_cpu_mem_usage=low_cpu)


def error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0]


def save_adapter(args, adapter_dir: Path) -> str:
    """Random (non-zero) LoRA weights saved by peftlite, or by PEFT if PEFT cannot read those."""
    failure = None
    for name in ("peftlite", "PEFT"):
        lib = LIBS[name]
        try:
            model = lib.get_peft_model(build(args.layers, args.hidden), lora_config(lib, init_lora_weights=False))
            model.save_pretrained(str(adapter_dir))
            del model
            gc.collect()
            peft.PeftModel.from_pretrained(build(args.layers, args.hidden, materialise=False), str(adapter_dir),
                                           low_cpu_mem_usage=True)
            return f"saved by {name}" + (f" (peftlite's save failed: {failure})" if failure else "")
        except Exception as exc:  # noqa: BLE001 - reported, then PEFT saves instead
            failure = error(exc)
        gc.collect()
    raise RuntimeError(f"no adapter could be saved: {failure}")


def floors(path: Path, shapes: dict[str, torch.Size]) -> dict:
    def init():
        return [torch.empty(shape).uniform_(-0.1, 0.1) if "lora_A" in key else torch.empty(shape).zero_()
                for key, shape in shapes.items()]

    return {"raw read": lambda: load_file(path), "full read": lambda: load(path.read_bytes()), "init": init}


def one_round(args, adapter_dir: Path, first: str, floor_fns: dict, times: dict, errors: dict) -> None:
    """Every row once per library (`first` leading), each on a fresh model, then every floor once."""
    order = [first] + [name for name in LIBS if name != first]
    for row in ROWS:
        for name in order:
            if (row, name) in errors:
                continue
            model = build(args.layers, args.hidden)
            gc.collect()
            start = time.perf_counter()
            try:
                result = run_row(LIBS[name], row, model, adapter_dir)
                times[row, name].append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - a library bug becomes an "error" row
                errors[row, name], result = error(exc), None
            del model, result
            gc.collect()
    for floor, fn in floor_fns.items():
        start = time.perf_counter()
        fn()
        times[floor, "-"].append(time.perf_counter() - start)


def meta_check(lib, args, adapter_dir: Path, file: dict[str, torch.Tensor]) -> list[str]:
    """Wrap, then load, with low_cpu_mem_usage=True on a base that stays on the meta device."""
    lines = []
    for step in ("wrap", "load"):
        model = build(args.layers, args.hidden, materialise=False)
        try:
            start = time.perf_counter()
            if step == "wrap":
                wrapped = lib.get_peft_model(model, lora_config(lib), low_cpu_mem_usage=True)
            else:
                wrapped = lib.PeftModel.from_pretrained(model, str(adapter_dir), low_cpu_mem_usage=True)
            seconds = time.perf_counter() - start
            base = [p for n, p in wrapped.named_parameters() if "lora_" not in n]
            lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
            line = (f"{step}: ok in {seconds * 1e3:.0f} ms; on meta: base weights {sum(p.is_meta for p in base)}"
                    f"/{len(base)}, LoRA weights {sum(p.is_meta for p in lora)}/{len(lora)}")
            if step == "load":
                loaded = lib.get_peft_model_state_dict(wrapped)
                same = sum(k in loaded and not loaded[k].is_meta and torch.equal(loaded[k], v) for k, v in file.items())
                extra = len(set(loaded) - set(file))
                line += f"; LoRA tensors equal to the file's {same}/{len(file)}" + (f", {extra} extra" if extra else "")
            lines.append(line)
            del wrapped
        except Exception as exc:  # noqa: BLE001
            lines.append(f"{step}: {error(exc)}")
        del model
        gc.collect()
    return lines


def summary(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:9.1f} [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]"


def ratio(mine: list[float], theirs: list[float]) -> str:
    if not mine or not theirs:
        return "-"
    paired = statistics.median(a / b for a, b in zip(mine, theirs))
    return f"{statistics.median(mine) / statistics.median(theirs):.3g} ({paired:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048, help="a multiple of 128 (head size 128)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp)
        saved = save_adapter(args, adapter_dir)
        file = load_file(adapter_dir / FILE)
        params = sum(p.numel() for p in build(args.layers, args.hidden, materialise=False).parameters())
        print(f"Llama-shaped, {args.layers} layers, d={args.hidden}, {params / 1e9:.2f}B params fp32; r=16 all-linear; "
              f"adapter {sum(t.nbytes for t in file.values()) / 2**20:.1f} MiB, {len(file)} tensors, {saved}; "
              f"torch {torch.__version__}, peft {peft.__version__}, peftlite {peftlite.__version__}, "
              f"{args.threads} threads")

        times: dict[tuple[str, str], list[float]] = {(row, name): [] for row in ROWS for name in LIBS}
        floor_fns = floors(adapter_dir / FILE, {key: tensor.shape for key, tensor in file.items()})
        times |= {(floor, "-"): [] for floor in floor_fns}
        errors: dict[tuple[str, str], str] = {}
        one_round(args, adapter_dir, "peftlite", floor_fns, {key: [] for key in times}, errors)  # warm-up
        for rep in range(args.reps):
            one_round(args, adapter_dir, list(LIBS)[rep % 2], floor_fns, times, errors)

        print(f"\nms, median [min-max] of {args.reps} reps; ratios of medians (median of per-rep ratios)")
        print(f"  {'':24} {'peftlite':>22} {'PEFT':>22}   {'peftlite/PEFT':>16} {'peftlite/floor':>16} "
              f"{'PEFT/floor':>16}  floor")
        for row in ROWS:
            lite, theirs = times[row, "peftlite"], times[row, "PEFT"]
            cells = {name: "error, see below" if (row, name) in errors else summary(times[row, name]) for name in LIBS}
            head = f"  {row:24} {cells['peftlite']:>22} {cells['PEFT']:>22}   {ratio(lite, theirs):>16}"
            row_floors = ["init"] if row == "wrap" else [] if row.startswith("wrap") else ["raw read", "full read"]
            tails = [f" {ratio(lite, times[floor, '-']):>16} {ratio(theirs, times[floor, '-']):>16}  {floor}"
                     for floor in row_floors] or [""]
            print(head + tails[0])
            for tail in tails[1:]:
                print(" " * len(head) + tail)
        print("  floors: " + "; ".join(f"{floor} {summary(values).strip()}"
                                       for (floor, name), values in times.items() if name == "-"))
        print("  goals: peftlite/PEFT <= 0.1 on wrap, peftlite/raw read <= 3 on load")
        for (row, name), message in errors.items():
            print(f"  {name} {row}: {message}")

        print("\nlow_cpu_mem_usage=True on a base left on the meta device")
        for name, lib in LIBS.items():
            for line in meta_check(lib, args, adapter_dir, file):
                print(f"  {name:9} {line}")


if __name__ == "__main__":
    main()
