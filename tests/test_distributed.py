"""`peftlite train` data-parallel on CPU: DDP and FSDP2 over gloo, started by `accelerate launch`.

Run: .venv/bin/pytest tests/test_distributed.py -x -q

Two processes with --batch-size 4 see the same global batches as one process
with --batch-size 8 (one seeded shuffle; each process takes its share), and
DDP/FSDP average the per-process mean losses' gradients, so the adapters must
agree to float rounding. The model has no dropout and --lora-dropout 0, so
nothing random differs between the runs. All three runs start together.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert, tiny_word_tokenizer
from transformers import AutoModelForSequenceClassification

from peftlite import LoraModel

ROOT = Path(__file__).resolve().parents[1]
# Module fixtures train once; with `pytest -n 2 --dist loadgroup` this file stays on one worker.
pytestmark = pytest.mark.xdist_group("distributed")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
WORDS = ["the", "movie", "was", "good", "great", "bad", "awful", "plot", "very"]
GLOBAL_BATCH, EXAMPLES, EPOCHS = 8, 32, 2
TRAIN_ARGS = ["train", "--model", "bert", "--data", "train.csv", "--task", "seq-cls", "--r", "4",
              "--lora-dropout", "0", "--epochs", str(EPOCHS), "--lr", "1e-2", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def accelerate_launch(flags: list[str], output: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Two CPU processes in one gloo group (SPEC: ACCELERATE_USE_CPU=1 ... --num_processes 2)."""
    command = [ACCELERATE, "launch", *flags, "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "peftlite", *TRAIN_ARGS, "--batch-size", str(GLOBAL_BATCH // 2), "--output", output]
    return launch(command, cwd, {**env, "ACCELERATE_USE_CPU": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """One process, DDP and FSDP2 trainings of the same adapter: the directory and each JSON result."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny_bert(num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "bert")
    tiny_word_tokenizer(WORDS).save_pretrained(root / "bert")
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(EXAMPLES):  # varied lengths, so padding differs between per-process batches
            word = ["bad", "good", "awful", "great"][i % 4]
            writer.writerow([" ".join(["the", "movie", "was"] + ["very"] * (i % 3) + [word]), int(i % 2)])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    running = {
        "one": launch([sys.executable, "-m", "peftlite", *TRAIN_ARGS, "--batch-size", str(GLOBAL_BATCH),
                       "--output", "one"], root, env),
        "ddp": accelerate_launch(["--multi_gpu"], "ddp", root, env),
        "fsdp": accelerate_launch(["--use_fsdp", "--fsdp_version", "2"], "fsdp", root, env),
    }
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {err[-4000:]}"
        lines = out.strip().splitlines()
        assert len(lines) == 1, f"{name}: only the main process prints, got {out!r}"
        results[name] = json.loads(lines[0])
    return root, results


def adapter_tensors(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(root / name / "adapter_model.safetensors")


def assert_same_adapter(root: Path, a: str, b: str) -> None:
    first, second = adapter_tensors(root, a), adapter_tensors(root, b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-4, rtol=0), key


def test_two_process_ddp_trains_the_same_adapter_as_one_process(runs):
    root, results = runs
    steps = EPOCHS * EXAMPLES // GLOBAL_BATCH
    assert results["one"]["steps"] == results["ddp"]["steps"] == steps
    assert (results["ddp"]["processes"], results["ddp"]["distributed"]) == (2, "MULTI_CPU")
    assert results["ddp"]["loss"] == pytest.approx(results["one"]["loss"], abs=1e-4)
    assert_same_adapter(root, "one", "ddp")
    # and training did something: every LoRA B left its zero init
    lora_B = [t for k, t in adapter_tensors(root, "ddp").items() if "lora_B" in k]
    assert lora_B and all(t.abs().sum() > 0 for t in lora_B)


def test_fsdp2_on_cpu_saves_a_loadable_adapter_equal_to_one_process(runs):
    root, results = runs
    assert (results["fsdp"]["processes"], results["fsdp"]["distributed"]) == (2, "FSDP")
    assert sorted(os.listdir(root / "fsdp")) == sorted(os.listdir(root / "one"))
    assert_same_adapter(root, "one", "fsdp")
    base = AutoModelForSequenceClassification.from_pretrained(root / "bert")
    model = LoraModel.from_pretrained(base, str(root / "fsdp")).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    reference = LoraModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(root / "bert"),
                                          str(root / "one")).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
