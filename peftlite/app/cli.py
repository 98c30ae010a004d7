"""The `peftlite` command line: train, eval, merge, inspect, push, demo.

Each command checks all of its input (files, columns, hyperparameters, the
adapter) before it loads a model or writes anything, ends with one JSON line
on stdout, and shows progress bars and tables on stderr. Bad input exits with
status 2 and one line on stderr naming the value; no traceback, nothing
written. `train` runs through accelerate, so `accelerate launch ... -m
peftlite train ...` trains data-parallel; only the main process writes and
prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors import SafetensorError
from transformers import AutoTokenizer
from transformers.utils import logging

from ..config import LoraConfig
from ..io.compat import peft_compatibility
from ..io.files import read_adapter
from ..io.keys import parse_file_key
from ..peft_model import LoraModel, get_lora_model
from ..storage.atomic import staging_directory
from ..storage.hub import push_directory
from ..tuner.kbit import dequantize_and_merge, prepare_model_for_kbit_training, quantization_kwargs
from . import training
from .demo import run as run_demo
from .training import TASK_TYPES, has_tokenizer

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# ---- argument types: each raises with the value and what was expected ------------
def _number(text: str, kind: type, name: str, low: float, low_ok: bool, high: float | None = None):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    in_range = (value >= low if low_ok else value > low) and (high is None or value < high)
    if not math.isfinite(value) or not in_range:
        bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise argparse.ArgumentTypeError(f"{name}={text} is invalid: expected {bound}")
    return value


def _positive_int(name: str):
    return lambda text: _number(text, int, name, 1, True)


def _positive_float(name: str):
    return lambda text: _number(text, float, name, 0, False)


def _dropout(text: str) -> float:
    return _number(text, float, "lora_dropout", 0, True, 1)


def _seed(text: str) -> int:
    return _number(text, int, "seed", 0, True)


def _targets(text: str) -> list[str] | str:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected module names separated by commas, "
                                         "or all-linear")
    return "all-linear" if names == ["all-linear"] else names


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (its default prints the whole usage first)."""

    def error(self, message: str):
        _fail(f"{self.prog}: error: {message}")


def _fail(message: str):
    if os.environ.get("RANK", "0") == "0":
        print(" ".join(str(message).split()), file=sys.stderr)
    sys.exit(2)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local directory or Hub id of the base model")
    parser.add_argument("--data", required=True, help=".csv, .tsv, .jsonl, or .txt (causal-lm only)")
    parser.add_argument("--task", required=True, choices=list(TASK_TYPES))
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--num-labels", type=_positive_int("num_labels"), default=None)
    parser.add_argument("--batch-size", type=_positive_int("batch_size"), default=16, help="per process")
    parser.add_argument("--max-length", type=_positive_int("max_length"), default=128)


def _quant_options(parser: argparse.ArgumentParser) -> None:
    bits = parser.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", dest="load_in_bits", action="store_const", const=4,
                      help="load the base in 4-bit nf4 with bitsandbytes (QLoRA)")
    bits.add_argument("--load-in-8bit", dest="load_in_bits", action="store_const", const=8,
                      help="load the base in 8-bit (LLM.int8) with bitsandbytes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peftlite", description="LoRA adapters in PEFT's file format")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a LoRA adapter (runs through accelerate)")
    _data_options(train)
    _quant_options(train)
    train.add_argument("--output", required=True, help="directory the adapter is saved to")
    train.add_argument("--r", type=_positive_int("r"), default=8)
    train.add_argument("--lora-alpha", type=_positive_float("lora_alpha"), default=16.0)
    train.add_argument("--lora-dropout", type=_dropout, default=0.05)
    train.add_argument("--target-modules", type=_targets, default=None, help="a,b | all-linear")
    train.add_argument("--epochs", type=_positive_int("epochs"), default=1)
    train.add_argument("--lr", type=_positive_float("lr"), default=2e-4)
    train.add_argument("--seed", type=_seed, default=0)

    evaluate = commands.add_parser("eval", help="accuracy (seq-cls) or perplexity (causal-lm) of an adapter")
    _data_options(evaluate)
    _quant_options(evaluate)
    evaluate.add_argument("--adapter", required=True, help="adapter directory or Hub id")

    merge = commands.add_parser("merge", help="write base + adapter as a plain transformers model")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    _quant_options(merge)  # the base the adapter was trained on; the merged model is written in float
    merge.add_argument("--task", choices=list(TASK_TYPES), default=None,
                       help="model class to load (default: the adapter's task_type)")

    inspect = commands.add_parser("inspect", help="an adapter's config, modules, shapes and parameter count")
    inspect.add_argument("adapter", metavar="DIR_OR_ID")

    push = commands.add_parser("push", help="upload an adapter directory to the Hub")
    push.add_argument("directory", metavar="DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to push to")

    commands.add_parser("demo", help="the whole loop on built-in data, offline")
    return parser


# ---- checks done before anything is loaded -------------------------------------
def check_model_id(model: str) -> None:
    """A local directory, or something that can be a Hub repo id."""
    if os.path.isdir(model):
        return
    if os.path.exists(model):
        raise UsageError(f"--model {model!r} is a file: expected a model directory or a Hub repo id")
    if not HUB_ID.fullmatch(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"--model {model!r} is not a directory and not a Hub repo id (org/name)")


def check_output_dir(output: str, must_be_empty: bool = False, model: str | None = None) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a file: expected a directory")
    if model is not None and os.path.isdir(model):
        base, target = os.path.realpath(model), os.path.realpath(output)
        if target == base or target.startswith(base + os.sep):
            raise UsageError(f"--output {output!r} is inside --model {model!r}: the adapter would be written into "
                             "the base model's directory; choose a directory outside it")
    if must_be_empty and os.path.isdir(output) and os.listdir(output):
        raise UsageError(f"--output {output!r} is not empty: choose a new or empty directory")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output {output!r}: parent directory {parent!r} does not exist")


def read_adapter_checked(adapter: str):
    """(config, weights) of an adapter, read fully so a bad adapter fails before a model loads."""
    if not os.path.isdir(adapter) and (os.path.exists(adapter) or not HUB_ID.fullmatch(adapter)):
        raise FileNotFoundError(f"adapter {adapter!r} is not a directory and not a Hub repo id")
    config, weights, _ = read_adapter(adapter)
    return config, weights


def _head_size(weights: dict) -> int | None:
    """num_labels of a seq-cls adapter, read from its saved classification head."""
    for key, tensor in weights.items():
        if re.search(r"\.(classifier|score)(\.out_proj)?\.weight$", key) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def _quiet_transformers() -> None:
    """Keep stderr to progress bars and our own lines (no per-weight load reports)."""
    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ---- commands ----------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> dict:


    examples = training.read_examples(args.data, args.task, args.text_column, args.label_column)
    num_labels = training.num_labels_for(examples, args.num_labels) if args.task == "seq-cls" else None
    check_model_id(args.model)
    check_output_dir(args.output, model=args.model)
    config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.target_modules, task_type=TASK_TYPES[args.task],
                        base_model_name_or_path=args.model)
    settings = training.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                      max_length=args.max_length, seed=args.seed)
    _quiet_transformers()
    tokenizer = training.load_tokenizer(args.model)

    def build():
        base = training.load_base_model(args.model, args.task, num_labels, tokenizer.pad_token_id,
                                        args.load_in_bits)
        if args.load_in_bits:
            prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        return get_lora_model(base, config)

    accelerator = training.make_accelerator()
    set_seed(args.seed)  # the same initial weights (LoRA A, a new head) on every process
    model = build()
    def save(trained) -> None:
        trained.save_pretrained(args.output)
        training.save_label_names(args.output, examples.label_names)  # eval maps labels as train did

    result = training.train(accelerator, model, tokenizer, examples, args.task, settings, save=save,
                            build_model=build)
    if not accelerator.is_main_process:
        return {}
    return {"output": os.path.abspath(args.output), **result, "processes": accelerator.num_processes}


def _load_with_adapter(model_id: str, adapter: str, task: str | None, num_labels: int | None = None,
                       pad_token_id: int | None = None, load_in_bits: int | None = None):
    """Base model + adapter, loaded after the adapter has been read and checked.

    The model class comes from `task`, else the adapter's task_type, else the
    architecture named in the base model's config.
    """

    config, weights = read_adapter_checked(adapter)
    task = task or {v: k for k, v in TASK_TYPES.items()}.get(config.task_type)
    head = _head_size(weights)
    if task == "seq-cls" and num_labels is not None and head is not None and head != num_labels:
        raise UsageError(f"--num-labels {num_labels} does not match adapter {adapter!r}: its head has {head}")
    check_model_id(model_id)
    _quiet_transformers()
    if task is None:
        import transformers
        architectures = transformers.AutoConfig.from_pretrained(model_id).architectures or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        base = (model_class or transformers.AutoModel).from_pretrained(model_id, **quantization_kwargs(load_in_bits))
    else:
        base = training.load_base_model(model_id, task, num_labels or head, pad_token_id, load_in_bits)
    return LoraModel.from_pretrained(base, adapter)


def cmd_eval(args: argparse.Namespace) -> dict:

    examples = training.read_examples(args.data, args.task, args.text_column, args.label_column,
                                      training.read_label_names(args.adapter))
    if args.num_labels is not None and args.task == "seq-cls":
        training.num_labels_for(examples, args.num_labels)
    read_adapter_checked(args.adapter)  # before the tokenizer: a bad adapter is the likelier mistake
    check_model_id(args.model)
    _quiet_transformers()
    tokenizer = training.load_tokenizer(args.model)
    model = _load_with_adapter(args.model, args.adapter, args.task, args.num_labels, tokenizer.pad_token_id,
                               args.load_in_bits)
    if args.task == "seq-cls":
        classes = model.config.num_labels
        largest = max(examples.labels or [0])
        if largest >= classes:
            raise UsageError(f"label id {largest} in {args.data!r} is out of range: "
                             f"the adapter's head has {classes} labels")
    if not args.load_in_bits:  # a quantized model was placed by its device_map and cannot move
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    return training.evaluate(model, tokenizer, examples, args.task, args.max_length, args.batch_size)


def cmd_merge(args: argparse.Namespace) -> dict:

    check_output_dir(args.output, must_be_empty=True)
    model = _load_with_adapter(args.model, args.adapter, args.task, load_in_bits=args.load_in_bits)
    # over a quantized base: W + ΔW in float (the base as trained), not requantized
    merged: Any = dequantize_and_merge(model) if args.load_in_bits else model.merge_and_unload()
    tokenizer = None  # a model without a tokenizer (vision, plain): merge the weights alone
    if has_tokenizer(args.model):
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            pass
    # Write next to the target, then move it in: a failure leaves no half-written model behind.
    parent = os.path.dirname(os.path.abspath(args.output))
    staging = staging_directory(parent, ".peftlite-merge-")  # and clears those of killed merges
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if os.path.isdir(args.output):
            os.rmdir(args.output)  # checked empty above
        os.replace(staging, args.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"output": os.path.abspath(args.output), "model_class": type(merged).__name__,
            "parameters": sum(p.numel() for p in merged.parameters()), "tokenizer": tokenizer is not None}


def describe_adapter(config, weights: dict) -> dict:
    """Adapted modules with their A/B shapes, and the other saved tensors (modules_to_save, biases)."""
    modules: dict[str, dict[str, Any]] = {}
    others: dict[str, list[int]] = {}
    for key in sorted(weights):
        shape = list(weights[key].shape)
        found = parse_file_key(key)
        if found:
            path, kind = found
            modules.setdefault(path, {})[kind] = shape
        else:
            others[key.removeprefix("base_model.model.")] = shape
    for shapes in modules.values():
        shapes["r"] = shapes.get("lora_A", [0])[0]  # A is (r, in) for every layer kind, in PEFT's files too
    lora = sum(weights[k].numel() for k in weights if parse_file_key(k))
    total = sum(t.numel() for t in weights.values())
    return {"config": config.to_dict(), "modules": modules, "other_tensors": others,
            "parameters": {"lora": lora, "other": total - lora, "total": total}}


def _print_table(info: dict) -> None:
    rows = [(path, str(s.get("r")), "x".join(map(str, s.get("lora_A", []))), "x".join(map(str, s.get("lora_B", []))))
            for path, s in info["modules"].items()]
    rows += [(path, "-", "x".join(map(str, shape)), "(saved in full)") for path, shape in info["other_tensors"].items()]
    header = ("module", "r", "lora_A", "lora_B")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)), file=sys.stderr)
    p = info["parameters"]
    print(f"parameters: {p['total']:,d} ({p['lora']:,d} LoRA, {p['other']:,d} other)", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> dict:
    config, weights = read_adapter_checked(args.adapter)
    info = describe_adapter(config, weights)
    info["peft_compatibility"] = peft_compatibility(args.adapter)
    _print_table(info)
    compat = info["peft_compatibility"]
    print(f"loads in PEFT unchanged: {'yes' if compat['loads_in_peft_unchanged'] else 'no'}", file=sys.stderr)
    for line in compat["blocking"] + compat["notes"]:
        print(f"  - {line}", file=sys.stderr)
    return {"adapter": args.adapter, **info}


def cmd_push(args: argparse.Namespace) -> dict:
    if not os.path.isdir(args.directory):
        raise FileNotFoundError(f"adapter directory {args.directory!r} does not exist")
    read_adapter_checked(args.directory)  # push only what loads
    commit = push_directory(args.directory, args.repo_id, private=args.private or None, revision=args.revision)
    return {"repo_id": args.repo_id, "revision": args.revision or "main",
            "commit_url": str(getattr(commit, "commit_url", "")), "commit": str(getattr(commit, "oid", ""))}


def cmd_demo(args: argparse.Namespace) -> dict:
    return run_demo()


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "inspect": cmd_inspect,
            "push": cmd_push, "demo": cmd_demo}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (files, columns, values, adapters, Hub access), not a bug.

    The Hub client's HTTP and connection errors are OSErrors; safetensors' own error is not.
    """
    return ValueError, KeyError, OSError, SafetensorError


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its result is printed as one JSON line. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except _user_errors() as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        _fail(f"peftlite {args.command}: error: {message}")
    if result:
        print(json.dumps(result), flush=True)
    return 0
