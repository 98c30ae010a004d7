"""Training step time and peak memory: frozen floor vs PEFT vs peftlite.

The model: a Llama-style causal LM (4 layers, d=512, intermediate 1376, vocab 8192, random
weights from a config: no Hub), fp32, r=16 on q,k,v,o,gate,up,down, batch 8, 2 CPU threads.
A step is forward + backward + AdamW on the trainable parameters, fused as transformers' Trainer
runs it by default (optim "adamw_torch_fused" with torch >= 2.8).

- floor: the same model and batch with every weight frozen; one trainable scalar multiplies the
  input embeddings so autograd still runs backward through the whole model.
- peft / peftlite: LoRA with lora_dropout 0 and 0.1.
- peft-dora / peftlite-dora: DoRA (use_dora=True), dropout 0. `--inference` also times eval
  forwards (no grad, unmerged), DoRA against LoRA in each library.
- QLoRA (floor-4bit, peft-4bit-p0, peftlite-4bit-p0): the same weights loaded in 4-bit nf4 by
  bitsandbytes (fp32 compute, on CPU), measured against floor-4bit, the frozen 4-bit model.

Time (seq 256): every config is built once in this process, then steps are interleaved round by
round (floor, peft, peftlite, ...) so machine noise hits all alike; each figure is a median, and
each ratio is given two ways: of the medians, and the median of the ratios within one round.
Work (seq 256): the FLOPs of every matrix product in one step, base and rank-r apart, counted
at the aten calls. LoRA adds r=16 products worth 5.5% of the floor's, and saves the input
gradient of layer 0's q, k and v (their input, the embeddings, needs none): net 1.032x. So at
the base GEMMs' own speed the rank-r products would cost about 3% of a step; they run at less
than half that speed (skinny products, bound by memory bandwidth), which is most of the gap.
Memory (seq 512): each config runs in a fresh subprocess that reports its peak RSS
(VmHWM), the model build included, as a user sees it.

    .venv/bin/python benchmarks/train_step.py              # both, prints ratios
    .venv/bin/python benchmarks/train_step.py --rounds 3   # quicker, noisier
    .venv/bin/python benchmarks/train_step.py --skip-time --skip-mem   # the work only

Allocator: with glibc's default malloc, some large buffers (the 64 MiB logits-sized ones among
them) are returned to the OS after use and page-faulted back in on the next step. Which ones
depends on the heap's layout, so it differs per config and per run (the faults column shows
it: 0 to 49K a step for the floor alone), and it moves every ratio by a few percent. Keeping
freed memory in the process, as jemalloc/tcmalloc or these glibc tunables do, removes that
cost for all configs:
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
        .venv/bin/python benchmarks/train_step.py --skip-mem
The header line says which allocator setting a run used; peak RSS is best measured without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["floor", "peft-p0", "peftlite-p0", "peft-p0.1", "peftlite-p0.1"]
# DoRA (use_dora=True), dropout 0: --configs floor,peft-dora-p0,peftlite-dora-p0 (and --inference for eval).
DORA_CONFIGS = ["peft-dora-p0", "peftlite-dora-p0"]
# The MoE case (--configs moe-floor,moe-peft,moe-peftlite): see build_moe.
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
BATCH, RANK, ALPHA = 8, 16, 32
# QLoRA (--configs floor-4bit,peft-4bit-p0,peftlite-4bit-p0): the same model loaded in 4-bit nf4, fp32 compute;
# each is compared with floor-4bit, the 4-bit model frozen.
QLORA_CONFIGS = ["floor-4bit", "peft-4bit-p0", "peftlite-4bit-p0"]


def llama_config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=8192, max_position_embeddings=1024,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)


def checkpoint_4bit() -> str:
    """The float model (seed 0) saved once, for loading in 4-bit: transformers quantizes in from_pretrained."""
    path = os.path.join(tempfile.gettempdir(), "peftlite-bench-train-step-llama")
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config()).save_pretrained(path)
    return path


def load_4bit() -> nn.Module:
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(checkpoint_4bit(), quantization_config=quantization,
                                                device_map="cpu")


def build(config: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model for `config` in train mode, and its trainable parameters."""
    if config.startswith("moe-"):
        return build_moe(config.removeprefix("moe-"))
    torch.manual_seed(0)
    if "-4bit" in config:  # QLoRA: the same model loaded in 4-bit, then the same floor / peft / peftlite
        llama, config = load_4bit(), config.replace("-4bit", "")
    else:
        llama = LlamaForCausalLM(llama_config())
    if config == "floor":
        llama.requires_grad_(False)
        scale = nn.Parameter(torch.ones(()))  # the negligible trainable: autograd reaches every layer
        llama.register_parameter("floor_scale", scale)
        llama.get_input_embeddings().register_forward_hook(lambda module, args, out: out * scale)
        model = llama
    else:
        library, _, dropout = config.partition("-p")  # "peft-p0.1", "peftlite-dora-p0", ...
        library, dora = library.removesuffix("-dora"), library.endswith("-dora")
        if library == "peft":
            import peft
            model = peft.get_peft_model(llama, peft.LoraConfig(
                r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=float(dropout), use_dora=dora))
        else:
            import peftlite
            model = peftlite.get_lora_model(llama, peftlite.LoraConfig(
                r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=float(dropout), use_dora=dora))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def build_moe(config: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """The MoE case ("moe-floor", "moe-peft", "moe-peftlite"): a Mixtral-style LM, 4 layers, d=512,
    8 experts (intermediate 1376 each), top-2, vocab 8192; LoRA r=16 on q,k,v,o and both 3-D expert
    parameters (target_parameters), no dropout (PEFT refuses it there). transformers' default
    experts implementation (grouped_mm) runs the floor."""
    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(
        num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=8192, max_position_embeddings=1024, num_local_experts=8,
        num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    fields = dict(r=RANK, lora_alpha=ALPHA, target_modules=MOE_TARGETS, target_parameters=MOE_PARAMETERS)
    if config == "floor":
        mixtral.requires_grad_(False)
        scale = nn.Parameter(torch.ones(()))
        mixtral.register_parameter("floor_scale", scale)
        mixtral.get_input_embeddings().register_forward_hook(lambda module, args, out: out * scale)
        model = mixtral
    elif config == "peft":
        import peft
        model = peft.get_peft_model(mixtral, peft.LoraConfig(**fields))
    else:
        import peftlite
        model = peftlite.get_lora_model(mixtral, peftlite.LoraConfig(**fields))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def floor_of(config: str) -> str:
    """The frozen floor a config is measured against."""
    return "moe-floor" if config.startswith("moe-") else "floor-4bit" if "-4bit" in config else "floor"


class Step(NamedTuple):
    """One step: wall and process CPU seconds, the forward pass's wall seconds, minor page faults."""
    wall: float
    cpu: float
    forward: float
    faults: int


class Stepper:
    """One config ready to step: model, optimizer and a fixed batch."""

    def __init__(self, config: str, seq: int) -> None:
        self.model, params = build(config)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        self.ids = torch.randint(2, 8192, (BATCH, seq), generator=torch.Generator().manual_seed(1))

    def step(self) -> Step:
        start, cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        forward = time.perf_counter() - start
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Step(time.perf_counter() - start, time.process_time() - cpu, forward,
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def time_configs(configs: list[str], seq: int, rounds: int) -> dict[str, list[Step]]:
    """Every timed step per config, steps interleaved across configs round by round.

    CPU time (both threads summed) is printed beside wall time because on a shared machine wall
    time also counts the waits for a core.
    """
    steppers = {c: Stepper(c, seq) for c in configs}
    for stepper in steppers.values():  # warm-up: allocator, thread pool, lazy inits
        stepper.step()
    times: dict[str, list[Step]] = {c: [] for c in configs}
    for _ in range(rounds):
        for config, stepper in steppers.items():
            times[config].append(stepper.step())
    return times


def paired_ratio(steps: list[Step], reference: list[Step]) -> float:
    """Median over rounds of (this config's wall time / the reference's in the same round).

    The machine's speed drifts by ±10% over seconds on a shared host; a step and its reference
    taken a moment apart see the same drift, so this ratio is steadier than a ratio of medians.
    """
    return statistics.median(mine.wall / theirs.wall for mine, theirs in zip(steps, reference))


class OpTimes(TorchDispatchMode):
    """Wall time of every aten call run under it, and the FLOPs of the matrix products, by kind.

    Kinds: "base" products, "rank-r" products (a side ≤ RANK), and "other" (everything else).
    torch.utils.flop_counter misses in-place and out= products (addmm_, mm.out), which is how
    peftlite's Functions run most of theirs, so this counts the aten calls itself. The timing
    adds a few µs a call, and attention kernels count as "other".
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = dict.fromkeys(("base", "rank-r", "other"), 0)
        self.seconds = dict.fromkeys(self.flops, 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds, kind, flops = time.perf_counter() - start, "other", 0
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
            left, right = args[:2] if name in ("mm", "bmm") else args[1:3]
            m, k, n = left.shape[-2], left.shape[-1], right.shape[-1]
            kind, flops = ("rank-r" if min(m, k, n) <= RANK else "base"), 2 * math.prod(left.shape[:-1]) * k * n
        self.flops[kind] += flops
        self.seconds[kind] += seconds
        return out


def op_times(configs: list[str], seq: int, rounds: int) -> dict[str, OpTimes]:
    """`OpTimes` of each config over `rounds` steps, interleaved round by round as `time_configs`."""
    steppers = {c: Stepper(c, seq) for c in configs}
    for stepper in steppers.values():
        stepper.step()
    times = {c: OpTimes() for c in configs}
    for _ in range(rounds):
        for config, stepper in steppers.items():
            with times[config]:
                stepper.step()
    return times


def inference_times(seq: int, rounds: int) -> dict[str, float]:
    """Median wall seconds of an eval forward (no grad, adapters unmerged), LoRA and DoRA, interleaved."""
    configs = ["peft-p0", "peft-dora-p0", "peftlite-p0", "peftlite-dora-p0"]
    steppers = {c: Stepper(c, seq) for c in configs}
    times: dict[str, list[float]] = {c: [] for c in configs}
    with torch.no_grad():
        for stepper in steppers.values():
            stepper.model.eval()
            stepper.model(input_ids=stepper.ids)  # warm-up (and DoRA's norms, computed once in eval)
        for _ in range(rounds):
            for config, stepper in steppers.items():
                start = time.perf_counter()
                stepper.model(input_ids=stepper.ids)
                times[config].append(time.perf_counter() - start)
    return {c: statistics.median(t) for c, t in times.items()}


def peak_rss_child(config: str, seq: int) -> None:
    """Run in a fresh process: build, take two steps, print peak RSS in MiB (and after-build RSS)."""
    stepper = Stepper(config, seq)
    with open("/proc/self/statm") as statm:  # resident pages now: the model built, nothing run yet
        built = int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    stepper.step()
    stepper.step()
    # VmHWM, the high-water mark of this process image; not ru_maxrss, which Linux carries over
    # exec from the parent, so a child forked from a big parent would report the parent's size.
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # KiB
    print(json.dumps({"config": config, "peak_mib": peak, "built_mib": built}))


def peak_rss(config: str, seq: int, threads: int, runs: int) -> dict[str, float]:
    """The lowest peak of `runs` fresh processes (the allocator's high-water mark varies run to run)."""
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--rss-child", config, "--seq-mem", str(seq),
                              "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return min(results, key=lambda r: r["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per config (median taken)")
    parser.add_argument("--seq-time", type=int, default=256)
    parser.add_argument("--seq-mem", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-runs", type=int, default=2, help="fresh processes per config (lowest peak taken)")
    parser.add_argument("--configs", default=",".join(CONFIGS + DORA_CONFIGS))
    parser.add_argument("--inference", action="store_true",
                        help="also time eval forwards (no grad, no merge): DoRA against LoRA, PEFT and peftlite")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-mem", action="store_true")
    parser.add_argument("--skip-work", action="store_true")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.seq_mem)
    configs = args.configs.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, r={RANK}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(default allocator)')}")
    if not args.skip_time:
        times = time_configs(configs, args.seq_time, args.rounds)
        medians = {c: (statistics.median(step.wall for step in t), statistics.median(step.cpu for step in t))
                   for c, t in times.items()}
        print(f"\nstep time, seq {args.seq_time}, median of {args.rounds} interleaved steps: wall | CPU, "
              "ratios of the medians, and [the median of the ratios within each round, wall]")
        for config, (wall, cpu) in medians.items():
            line = f"  {config:14s} {wall * 1000:8.1f} ms {cpu * 1000:8.1f} ms"
            if floor_of(config) in medians:
                floor_wall, floor_cpu = medians[floor_of(config)]
                line += (f"   {wall / floor_wall:6.3f}x | {cpu / floor_cpu:6.3f}x "
                         f"[{paired_ratio(times[config], times[floor_of(config)]):6.3f}x] floor")
            peer = config.replace("peftlite", "peft")
            if "peftlite" in config and peer in medians:
                line += (f"   {wall / medians[peer][0]:6.3f}x | {cpu / medians[peer][1]:6.3f}x "
                         f"[{paired_ratio(times[config], times[peer]):6.3f}x] peft")
            print(line)
        print("\nwhere a step goes (medians): forward | backward + optimizer, wall ms; minor page faults")
        for config, steps in times.items():
            forward = statistics.median(step.forward for step in steps)
            rest = statistics.median(step.wall - step.forward for step in steps)
            print(f"  {config:14s} {forward * 1000:8.1f} | {rest * 1000:8.1f} ms "
                  f"{statistics.median(step.faults for step in steps):9.0f} faults")
    if not args.skip_work:
        print(f"\nwork of a step, seq {args.seq_time}: matrix-product GFLOP (x floor); "
              "ms (share of the step) at GFLOP/s, by kind of op; 3 interleaved steps")
        steps = 3
        work = op_times(configs, args.seq_time, steps)
        for config, w in work.items():
            floor_flops = sum(work[floor_of(config)].flops.values()) if floor_of(config) in work else None
            total_flops, total_seconds = sum(w.flops.values()), sum(w.seconds.values())
            line = f"  {config:14s} {total_flops / steps / 1e9:6.1f}"
            line += f" ({total_flops / floor_flops:5.3f}x)" if floor_flops else ""
            for kind in w.flops:
                line += f"   {kind} {w.seconds[kind] / steps * 1000:5.0f} ({w.seconds[kind] / total_seconds:5.1%})"
                line += f" at {w.flops[kind] / w.seconds[kind] / 1e9:3.0f}" if w.flops[kind] else ""
            print(line)
    if args.inference:
        medians = inference_times(args.seq_time, args.rounds)
        print(f"\neval forward, seq {args.seq_time}, no grad, unmerged: median of {args.rounds} interleaved calls")
        for library in ("peft", "peftlite"):
            lora, dora = medians[f"{library}-p0"], medians[f"{library}-dora-p0"]
            print(f"  {library:9s} LoRA {lora * 1000:8.1f} ms   DoRA {dora * 1000:8.1f} ms   DoRA/LoRA {dora / lora:6.3f}x")
    if not args.skip_mem:
        print(f"\npeak RSS, seq {args.seq_mem}, lowest of {args.mem_runs} fresh processes per config")
        if any("-4bit" in config for config in configs):
            checkpoint_4bit()  # written here, so no measured process builds the float model first
        results = {config: peak_rss(config, args.seq_mem, args.threads, args.mem_runs) for config in configs}
        for config, r in results.items():
            floor = results.get(floor_of(config))
            ratio = f"{r['peak_mib'] / floor['peak_mib']:6.3f}x floor" if floor else ""
            above = (f"  (above the built model: {(r['peak_mib'] - r['built_mib']) / (floor['peak_mib'] - floor['built_mib']):5.3f}x)"
                     if floor else "")
            print(f"  {config:14s} {r['peak_mib']:8.0f} MiB  {ratio}{above}")


if __name__ == "__main__":
    main()
