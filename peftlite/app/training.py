"""Data, tokenisation, the accelerate training loop and evaluation behind the `peftlite` CLI.

Reads a data file (.csv, .tsv, .jsonl, or .txt for causal LM), turns it into
padded token batches, trains the LoRA parameters with AdamW through
`accelerate.Accelerator` (DDP or FSDP when started by `accelerate launch`),
and measures accuracy or perplexity. Every check on the data happens in
`read_examples`, before any model is loaded, so the CLI can fail early and
write nothing.

Data-parallel semantics, chosen so that N processes with `batch_size` b train
exactly like 1 process with batch size N·b on the same global batches:
- each process takes its own b examples per step (`split_batches=False`, as
  Trainer's `per_device_train_batch_size`), the shuffle comes from one seeded
  generator that accelerate keeps in step across processes;
- the loss is the per-process mean, and DDP averages gradients, so the
  gradient is the mean over the global batch;
- the learning-rate schedule is stepped once per optimiser step (not handed
  to accelerate, which would step it once per process).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from ..storage import hub
from ..storage.atomic import atomic_write_all, prepare_directory, text_writer
from ..tuner.kbit import quantization_kwargs

TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".txt")
DATA_ENCODING = "utf-8-sig"  # UTF-8, with or without the byte-order mark Excel writes
MAX_LABELS = 100_000  # a label id beyond this is a data error, not a classifier head to allocate
LABELS_NAME = "peftlite_labels.json"  # beside adapter_config.json: the train file's string labels, id = index


# ---- data --------------------------------------------------------------------
@dataclass
class Examples:
    """Texts and, for seq-cls, integer labels (one per text)."""

    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None  # set when the file's labels were strings, sorted; id = index


def check_data_path(path: str, task: str) -> str:
    """FileNotFoundError / ValueError for a data file the task cannot use; returns its suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"data file {path!r} has an unsupported type: expected one of {list(DATA_SUFFIXES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if suffix == ".txt" and task != "causal-lm":
        raise ValueError(f"data file {path!r} is plain text (no labels): .txt is for --task causal-lm only; "
                         "use .csv, .tsv or .jsonl for seq-cls")
    return suffix


def _read_rows(path: str, suffix: str) -> tuple[list[dict], list[str]]:
    """Rows as dicts, and the column names (CSV header, or keys of the first JSON object)."""
    with open(path, newline="", encoding=DATA_ENCODING) as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                return list(reader), list(reader.fieldnames or [])
            except csv.Error as err:  # e.g. a field over csv's 131,072-character limit
                raise ValueError(f"data file {path!r} line {reader.line_num} is not valid CSV: {err}") from None
        rows = []
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data file {path!r} line {number} is not valid JSON: {err.msg}") from None
            except RecursionError:
                raise ValueError(f"data file {path!r} line {number} is nested too deeply: expected a flat JSON "
                                 "object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"data file {path!r} line {number} is {type(row).__name__}: expected a JSON object")
            rows.append(row)
        return rows, list(rows[0]) if rows else []


def _column(rows: list[dict], columns: list[str], name: str, option: str, path: str) -> list:
    if name not in columns:
        raise ValueError(f"{option} {name!r} is not a column of {path!r}: columns are {columns}")
    values = []
    for number, row in enumerate(rows, 1):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{option} {name!r} is empty in row {number} of {path!r}")
        values.append(value)
    return values


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _label_ids(values: list, path: str, known: list[str] | None = None) -> tuple[list[int], list[str] | None]:
    """Integer labels as they are; string labels become their index in `known` (the adapter's label
    names, saved at train time) or else in their sorted set."""
    maybe_ids = [_as_int(v) for v in values]
    ids = [i for i in maybe_ids if i is not None]
    if len(ids) == len(maybe_ids) and known is None:
        if min(ids) < 0 or max(ids) >= MAX_LABELS:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"label {bad} in {path!r} is out of range: expected 0 .. num_labels-1 "
                             f"(at most {MAX_LABELS} classes)")
        return ids, None
    names = sorted({str(v) for v in values}) if known is None else list(known)
    unknown = sorted({str(v) for v in values} - set(names))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} in {path!r} are not among the adapter's labels {names[:20]}")
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in values], names


def read_examples(path: str, task: str, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None) -> Examples:
    """Read and check a whole data file: ValueError / FileNotFoundError naming the file, column or row.

    label_names: the adapter's (eval): string labels map to their index there.
    """
    try:
        return _read_examples(path, task, text_column, label_column, label_names)
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path!r} is not UTF-8 text (byte {err.start}: {err.reason}): "
                         "save it as UTF-8") from None


def _read_examples(path: str, task: str, text_column: str, label_column: str,
                   label_names: list[str] | None) -> Examples:
    if task not in TASK_TYPES:
        raise ValueError(f"task {task!r} is unknown: expected one of {list(TASK_TYPES)}")
    suffix = check_data_path(path, task)
    if suffix == ".txt":
        with open(path, encoding=DATA_ENCODING) as handle:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
        labels, names = None, None
    else:
        rows, columns = _read_rows(path, suffix)
        if not rows:
            raise ValueError(f"data file {path!r} has no rows")
        texts = [str(t) for t in _column(rows, columns, text_column, "--text-column", path)]
        labels, names = None, None
        if task == "seq-cls":
            labels, names = _label_ids(_column(rows, columns, label_column, "--label-column", path), path,
                                       label_names)
    if not texts:
        raise ValueError(f"data file {path!r} has no texts")
    return Examples(texts, labels, names)


def save_label_names(directory: str, names: list[str] | None) -> None:
    """Write the train file's string labels (id = index) beside the adapter, as LABELS_NAME."""
    if names is not None:
        atomic_write_all(prepare_directory(directory), {LABELS_NAME: text_writer(json.dumps({"label_names": names}))})


def read_label_names(adapter: str) -> list[str] | None:
    """The label names saved with an adapter by `train`, or None (integer labels, or another tool's adapter)."""
    try:
        path = hub.resolve(adapter, LABELS_NAME)
    except (FileNotFoundError, OSError, ValueError):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            names = json.load(handle)["label_names"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a label map written by peftlite train ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: expected distinct label names, got {names!r}")
    return names


def num_labels_for(examples: Examples, num_labels: int | None) -> int:
    """--num-labels if given (checked against the data), else as many classes as the labels need."""
    needed = max(examples.labels or [0]) + 1
    if examples.label_names is not None:
        needed = len(examples.label_names)
    if num_labels is None:
        return max(needed, 2)
    if needed > num_labels:
        raise ValueError(f"--num-labels {num_labels} is too small: the data has label id {needed - 1}")
    return num_labels


# ---- models and batches --------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer(model_id: str) -> bool:
    """Whether a local model directory ships a tokenizer (transformers 5 builds an empty one when it does not)."""
    return not os.path.isdir(model_id) or any(os.path.isfile(os.path.join(model_id, f)) for f in TOKENIZER_FILES)


def load_tokenizer(model_id: str):
    """The model's tokenizer; a tokenizer without a pad token (GPT-2) pads with its EOS token."""
    if not has_tokenizer(model_id):
        raise FileNotFoundError(f"--model {model_id!r} has no tokenizer: expected one of {list(TOKENIZER_FILES)}")
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model_id!r} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_id: str, task: str, num_labels: int | None = None, pad_token_id: int | None = None,
                    load_in_bits: int | None = None):
    """A transformers model for the task: sequence classification (with `num_labels`) or causal LM;
    load_in_bits 4 or 8 loads it quantized by bitsandbytes (`quantization_kwargs`)."""
    quantized = quantization_kwargs(load_in_bits)
    if task == "seq-cls":
        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        model = AutoModelForSequenceClassification.from_pretrained(model_id, **kwargs, **quantized)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_id, **quantized)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # GPT-2 style classifiers find the last token by it
    return model


def make_loader(tokenizer, examples: Examples, task: str, max_length: int, batch_size: int,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Tokenise once; each batch is padded to its longest text. Causal-LM labels are the ids, pads -100."""
    encoded = tokenizer(examples.texts, truncation=True, max_length=max_length)
    items = [{"input_ids": ids, "attention_mask": mask}
             for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    if examples.labels is not None and task == "seq-cls":
        for item, label in zip(items, examples.labels):
            item["labels"] = label

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad(batch, return_tensors="pt")
        if task == "causal-lm":
            padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
        return dict(padded)

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,  # type: ignore[arg-type]
                      generator=generator)


# ---- training ------------------------------------------------------------------
@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 16   # per process, like per_device_train_batch_size
    lr: float = 2e-4
    max_length: int = 128
    seed: int = 0


def make_accelerator():
    """An Accelerator configured by `accelerate launch` (or one CPU/GPU process when run directly)."""
    return Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=False))


def is_fsdp(accelerator) -> bool:
    """accelerate's own FSDP (GPUs): it wraps the model in `prepare`."""
    return accelerator.distributed_type == DistributedType.FSDP


def is_cpu_fsdp(accelerator) -> bool:
    """`accelerate launch --use_fsdp` on CPU: accelerate 1.15 keeps such processes plain MULTI_CPU
    (its FSDP1 plugin refuses CPU, FSDP2 is ignored), so peftlite applies torch's FSDP2 itself."""
    return (accelerator.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def shard_fsdp2(model: nn.Module) -> Any:
    """torch FSDP2 over the default (gloo) group: each transformer block is one unit, the rest the root."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    return fully_shard(model)


def train(accelerator, model: nn.Module, tokenizer, examples: Examples, task: str, settings: TrainSettings,
          save: Callable[[nn.Module], None], build_model: Callable[[], nn.Module]) -> dict:
    """Train the trainable (LoRA) parameters of `model` and hand the trained model to `save`.

    Build `model` after `accelerate.utils.set_seed(settings.seed)` so every
    process starts from the same weights. `save` runs on the main process
    only. Under FSDP the parameters are sharded, so the full state is
    gathered on every process and loaded into a fresh `build_model()` on the
    main process before saving.

    Returns {"steps", "loss" (mean loss of the last global batch), "seconds", "distributed"}.
    """
    model.train()
    loader = make_loader(tokenizer, examples, task, settings.max_length, settings.batch_size,
                         shuffle=True, seed=settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if is_cpu_fsdp(accelerator) or (is_fsdp(accelerator) and not accelerator.is_fsdp2):
        # Our FSDP2 on CPU and accelerate's FSDP1 replace the parameters: shard first, then build the
        # optimiser on the sharded ones (accelerate's FSDP2 instead remaps an optimiser prepared with it).
        model = shard_fsdp2(model) if is_cpu_fsdp(accelerator) else accelerator.prepare(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        optimizer = torch.optim.AdamW(params, lr=settings.lr)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = settings.epochs * len(loader)
    # Linear decay to zero, Trainer's default; stepped here once per step (see module docstring).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))

    start, step, last_loss = time.perf_counter(), 0, float("nan")
    bar = tqdm(total=total, desc="train", disable=not accelerator.is_local_main_process)
    for _ in range(settings.epochs):
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(last_loss):
                raise ValueError(f"training loss became {last_loss} at step {step + 1}: try a smaller --lr")
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
    bar.close()
    seconds = time.perf_counter() - start

    if is_fsdp(accelerator) or is_cpu_fsdp(accelerator):
        # Collectives: every process takes part, the main one saves.
        if is_cpu_fsdp(accelerator):
            state = {name: p.full_tensor() for name, p in model.named_parameters()  # type: ignore[attr-defined]
                     if p.requires_grad}
        else:
            state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            plain = build_model()
            missing = {k for k, _ in plain.named_parameters() if _.requires_grad} - set(state)
            if missing:
                raise ValueError(f"FSDP state dict lacks trained parameters {sorted(missing)[:3]}")
            plain.load_state_dict(state, strict=False)
            save(plain)
    elif accelerator.is_main_process:
        save(accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    sharding = "FSDP" if is_cpu_fsdp(accelerator) else accelerator.distributed_type.value
    return {"steps": step, "loss": last_loss, "seconds": round(seconds, 3), "distributed": sharding}


# ---- evaluation ----------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: Examples, task: str, max_length: int = 128,
             batch_size: int = 16) -> dict:
    """{"accuracy": correct / n} for seq-cls; {"perplexity": exp(summed token NLL / tokens)} for causal LM."""
    model.eval()
    device = next(model.parameters()).device
    loader = make_loader(tokenizer, examples, task, max_length, batch_size)
    correct = count = 0
    nll = 0.0
    for batch in tqdm(loader, desc="eval"):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        if task == "seq-cls":
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        else:
            # next-token prediction: logits at t score token t+1; (B, T-1, V) against (B, T-1)
            targets = labels[:, 1:]
            nll += nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=-100, reduction="sum").item()
            count += (targets != -100).sum().item()
    if task == "seq-cls":
        return {"accuracy": correct / count, "examples": count}
    if count == 0:
        raise ValueError("no tokens to score: every text is a single token; use longer texts")
    return {"perplexity": math.exp(nll / count), "tokens": count}
