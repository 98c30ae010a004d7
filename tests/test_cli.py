"""The `peftlite` command line, driven as a user drives it: `python -m peftlite ...` in a subprocess.

Run: .venv/bin/pytest tests/test_cli.py -x -q

Tiny BERT / GPT-2 models and a word-level tokenizer are saved to tmp_path;
results are checked against the same computation done here in-process
(LoraModel.from_pretrained, transformers' own loss), and the written adapter
against real `peft`. Subprocesses are started together where they do not
depend on each other, because each one pays the torch import.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert, tiny_gpt2, tiny_word_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftlite import LoraModel
from peftlite.app import cli, training
from peftlite.app.cli import describe_adapter, main

ROOT = Path(__file__).resolve().parents[1]
# Module fixtures train once; with `pytest -n 2 --dist loadgroup` this file stays on one worker.
pytestmark = pytest.mark.xdist_group("cli")
POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]
WORDS = ["the", "movie", "was", "very", "a", "film", "plot"] + POSITIVE + NEGATIVE


def sentences(n: int) -> list[tuple[str, int]]:
    """Labelled sentences: 1 if the word after 'was' is positive."""
    out = []
    for i in range(n):
        label = i % 2
        word = (POSITIVE if label else NEGATIVE)[(i // 2) % 4]
        out.append((f"the {WORDS[5 - (i % 2)]} was very {word}", label))
    return out


def write_csv(path: Path, rows: list[tuple[str, int]], delimiter: str = ",",
              columns: tuple[str, str] = ("text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def env_for(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftlite", *args], cwd=cwd, env=env_for(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return finish(start(args, cwd))


def json_result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # exactly one JSON line on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with a tiny BERT classifier, a tiny GPT-2 (each with its tokenizer) and data files."""
    root = tmp_path_factory.mktemp("cli")
    bert = tiny_bert(num_labels=2)
    bert.config.hidden_dropout_prob = bert.config.attention_probs_dropout_prob = 0.0
    bert.save_pretrained(root / "bert")
    tiny_word_tokenizer(WORDS).save_pretrained(root / "bert")
    tiny_gpt2().save_pretrained(root / "gpt2")
    tiny_word_tokenizer(WORDS).save_pretrained(root / "gpt2")
    rows = sentences(24)
    write_csv(root / "train.csv", rows)
    write_csv(root / "named.csv", rows, columns=("sentence", "y"))
    (root / "lm.txt").write_text("\n".join(text for text, _ in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(work: Path) -> tuple[Path, dict]:
    """`peftlite train` on the seq-cls CSV: the adapter directory and the JSON result."""
    result = json_result(run_cli(["train", "--model", "bert", "--data", "train.csv", "--task", "seq-cls",
                                  "--output", "adapter", "--r", "4", "--epochs", "2", "--batch-size", "8",
                                  "--lr", "1e-2", "--lora-dropout", "0"], work))
    return work / "adapter", result


def lora_classifier(work: Path, adapter: Path) -> LoraModel:
    base = AutoModelForSequenceClassification.from_pretrained(work / "bert", num_labels=2)
    return LoraModel.from_pretrained(base, str(adapter)).eval()


# ---- train, eval, inspect, merge ----------------------------------------------------------------
def test_train_writes_an_adapter_that_loads_in_peftlite_and_peft(work, trained):
    adapter, result = trained
    assert result["output"] == str(adapter.resolve())
    assert result["steps"] == 2 * math.ceil(24 / 8)
    assert math.isfinite(result["loss"]) and result["seconds"] > 0 and result["processes"] == 1
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 16.0, "SEQ_CLS")

    from peft import PeftModel
    ours = lora_classifier(work, adapter)
    theirs = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(work / "bert"),
                                       str(adapter)).eval()
    batch = AutoTokenizer.from_pretrained(work / "bert")(["the movie was very good", "a plot"],
                                                          padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, theirs(**batch).logits, atol=1e-5)
    # training moved the LoRA B matrices off their zero init
    assert any(layer.factors("default")[1].abs().sum() > 0 for _, layer in ours.lora_layers())


def test_eval_inspect_merge_agree_with_the_loaded_adapter(work, trained):
    adapter, _ = trained
    running = {
        "eval": start(["eval", "--model", "bert", "--adapter", "adapter", "--data", "train.csv",
                       "--task", "seq-cls", "--batch-size", "5"], work),
        "inspect": start(["inspect", "adapter"], work),
        "merge": start(["merge", "--model", "bert", "--adapter", "adapter", "--output", "merged"], work),
    }
    results = {name: json_result(finish(process)) for name, process in running.items()}

    model = lora_classifier(work, adapter)
    texts = [text for text, _ in sentences(24)]
    labels = torch.tensor([label for _, label in sentences(24)])
    batch = AutoTokenizer.from_pretrained(work / "bert")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert results["eval"]["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())

    tensors = load_file(adapter / "adapter_model.safetensors")
    info = results["inspect"]
    assert set(info["modules"]) == {path for path, _ in model.lora_layers()}
    assert all(m["r"] == 4 for m in info["modules"].values())
    assert info["parameters"]["total"] == sum(t.numel() for t in tensors.values())
    assert info["config"]["r"] == 4

    merged = AutoModelForSequenceClassification.from_pretrained(work / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (work / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, logits, atol=1e-5)


def test_causal_lm_on_a_text_file_trains_and_reports_perplexity(work):
    result = json_result(run_cli(["train", "--model", "gpt2", "--data", "lm.txt", "--task", "causal-lm",
                                  "--output", "lm_adapter", "--target-modules", "c_attn,c_fc",
                                  "--batch-size", "12", "--lr", "1e-2"], work))
    assert result["steps"] == 2
    evaluated = json_result(run_cli(["eval", "--model", "gpt2", "--adapter", "lm_adapter", "--data", "lm.txt",
                                     "--task", "causal-lm", "--batch-size", "7"], work))
    # reference: transformers' own mean token loss over one batch of every text
    base = AutoModelForCausalLM.from_pretrained(work / "gpt2")
    model = LoraModel.from_pretrained(base, str(work / "lm_adapter")).eval()
    assert {p.rsplit(".", 1)[-1] for p, _ in model.lora_layers()} == {"c_attn", "c_fc"}
    texts = (work / "lm.txt").read_text().splitlines()
    batch = AutoTokenizer.from_pretrained(work / "gpt2")(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert evaluated["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)


# ---- every bad input: exit 2, one line naming the value, nothing written -------------------------
TRAIN = ["train", "--model", "bert", "--data", "train.csv", "--task", "seq-cls", "--output", "new_out"]
# One subprocess per kind of error (each pays a torch import); variants of a kind run in-process below.
ERRORS = {
    "missing data file": (["train", "--model", "bert", "--data", "missing.csv", "--task", "seq-cls",
                           "--output", "new_out"], "missing.csv"),
    "unknown text column": (TRAIN + ["--text-column", "body"], "'body'"),
    "unknown task": (["train", "--model", "bert", "--data", "train.csv", "--task", "translation",
                      "--output", "new_out"], "'translation'"),
    "rank zero": (TRAIN + ["--r", "0"], "r=0"),
    "missing model directory": (["train", "--model", "./no_such_model", "--data", "train.csv", "--task",
                                 "seq-cls", "--output", "new_out"], "no_such_model"),
    "corrupt adapter config": (["merge", "--model", "bert", "--adapter", "corrupt", "--output", "new_out"],
                               "corrupt"),
}
VARIANTS = {
    "unsupported data type": (["train", "--model", "bert", "--data", "train.parquet", "--task", "seq-cls",
                               "--output", "new_out"], "train.parquet"),
    "unknown label column": (["train", "--model", "bert", "--data", "named.csv", "--task", "seq-cls",
                              "--text-column", "sentence", "--output", "new_out"], "'label'"),
    "txt for seq-cls": (["train", "--model", "bert", "--data", "lm.txt", "--task", "seq-cls",
                         "--output", "new_out"], "lm.txt"),
    "negative lr": (TRAIN + ["--lr=-1e-4"], "lr=-1e-4"),
    "dropout of one": (TRAIN + ["--lora-dropout", "1"], "lora_dropout=1"),
    "zero epochs": (TRAIN + ["--epochs", "0"], "epochs=0"),
    "non-numeric batch size": (TRAIN + ["--batch-size", "many"], "'many'"),
    "too few labels": (TRAIN + ["--num-labels", "1"], "--num-labels 1"),
    "targets match nothing": (TRAIN + ["--target-modules", "nonexistent_proj"], "nonexistent_proj"),
    "adapter directory without files": (["eval", "--model", "bert", "--adapter", "empty_dir", "--data",
                                         "train.csv", "--task", "seq-cls"], "empty_dir"),
    "truncated adapter weights": (["inspect", "truncated"], "truncated"),
    "inspect a missing adapter": (["inspect", "./missing_adapter"], "missing_adapter"),
    "push a missing directory": (["push", "missing_dir", "org/name"], "missing_dir"),
    "unknown command": (["finetune"], "'finetune'"),
}


@pytest.fixture(scope="module")
def bad_files(work: Path) -> Path:
    (work / "empty_dir").mkdir(exist_ok=True)
    (work / "corrupt").mkdir(exist_ok=True)
    (work / "corrupt" / "adapter_config.json").write_text("{not json")
    (work / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    (work / "truncated").mkdir(exist_ok=True)
    (work / "truncated" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (work / "truncated" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (work / "train.parquet").write_bytes(b"PAR1")
    return work


@pytest.fixture(scope="module")
def error_runs(bad_files: Path) -> dict[str, subprocess.CompletedProcess]:
    before = sorted(os.listdir(bad_files))
    running = {name: start(args, bad_files) for name, (args, _) in ERRORS.items()}
    done = {name: finish(process) for name, process in running.items()}
    assert sorted(os.listdir(bad_files)) == before  # no output directory, no stray file
    return done


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_exits_2_with_one_line_naming_the_value(error_runs, case):
    done = error_runs[case]
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert ERRORS[case][1] in lines[0]


def test_the_console_script_is_the_same_command(bad_files):
    script = Path(sys.executable).parent / "peftlite"
    if not script.exists():
        pytest.skip("peftlite is not installed in this environment (pip install -e .)")
    done = subprocess.run([str(script), "inspect", "truncated"], cwd=bad_files, env=env_for(bad_files),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "truncated" in done.stderr


@pytest.mark.parametrize("case", list(VARIANTS))
def test_bad_input_variants_exit_2_in_process(bad_files, case, monkeypatch, capsys):
    monkeypatch.chdir(bad_files)
    before = sorted(os.listdir(bad_files))
    with pytest.raises(SystemExit) as exited:
        main(VARIANTS[case][0])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and VARIANTS[case][1] in err, err
    assert sorted(os.listdir(bad_files)) == before


def test_merge_refuses_a_non_empty_output_directory(work, trained, monkeypatch, capsys):
    monkeypatch.chdir(work)
    (work / "occupied").mkdir(exist_ok=True)
    (work / "occupied" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        main(["merge", "--model", "bert", "--adapter", "adapter", "--output", "occupied"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "occupied" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(work / "occupied") == ["keep.txt"]


# ---- push and demo (in-process: the Hub and the demo are replaced) --------------------------------
def test_push_uploads_the_adapter_files_in_one_commit(work, trained, monkeypatch, capsys):
    from huggingface_hub import HfApi
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("branch", repo_id, kw)))

    def create_commit(self, repo_id, operations, **kw):
        calls.append(("commit", repo_id, sorted(op.path_in_repo for op in operations), kw))
        return type("Commit", (), {"oid": "abc123", "commit_url": f"https://hub/{repo_id}/commit/abc123"})()
    monkeypatch.setattr(HfApi, "create_commit", create_commit)

    assert main(["push", str(trained[0]), "me/tiny-lora", "--private", "--revision", "dev"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["commit"] == "abc123" and result["revision"] == "dev"
    assert calls[0][:2] == ("repo", "me/tiny-lora") and calls[0][2]["private"] is True
    assert calls[1][:2] == ("branch", "me/tiny-lora") and calls[1][2]["branch"] == "dev"
    assert calls[2][2] == sorted(os.listdir(trained[0]))
    assert calls[2][3]["revision"] == "dev"


def test_demo_prints_what_peftlite_demo_run_returns(monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_demo", lambda: {"accuracy_before": 0.5, "accuracy_after": 0.9})
    assert main(["demo"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy_before": 0.5, "accuracy_after": 0.9}


# ---- data files (in-process) ----------------------------------------------------------------------
def test_csv_tsv_jsonl_give_the_same_examples(tmp_path):
    rows = sentences(6)
    write_csv(tmp_path / "d.csv", rows)
    write_csv(tmp_path / "d.tsv", rows, delimiter="\t")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    expected = ([t for t, _ in rows], [y for _, y in rows])
    for name in ("d.csv", "d.tsv", "d.jsonl"):
        examples = training.read_examples(str(tmp_path / name), "seq-cls")
        assert (examples.texts, examples.labels, examples.label_names) == (*expected, None)


def test_string_labels_become_ids_in_sorted_order(tmp_path):
    write_csv(tmp_path / "d.csv", [("a", "sports"), ("b", "business"), ("c", "sports"), ("d", "world")])
    examples = training.read_examples(str(tmp_path / "d.csv"), "seq-cls")
    assert examples.label_names == ["business", "sports", "world"]
    assert examples.labels == [1, 0, 1, 2]
    assert training.num_labels_for(examples, None) == 3


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": 0}\n[1, 2]\n', "line 2"),
    ('{"text": "a", "label": 0}\n{"text": "b"\n', "line 2"),
    ('{"text": "a", "label": 0}\n{"text": "", "label": 1}\n', "row 2"),
    ('{"text": "a", "label": -1}\n', "-1"),
])
def test_bad_jsonl_rows_are_named(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        training.read_examples(str(tmp_path / "d.jsonl"), "seq-cls")


def test_describe_adapter_counts_embedding_and_linear_pairs():
    from peftlite import LoraConfig
    shapes = {"base_model.model.emb.lora_embedding_A": (4, 16), "base_model.model.emb.lora_embedding_B": (8, 4),
              "base_model.model.lin.lora_A.weight": (4, 10), "base_model.model.lin.lora_B.weight": (20, 4),
              "base_model.model.head.weight": (2, 20)}
    info = describe_adapter(LoraConfig(r=4), {k: torch.zeros(s) for k, s in shapes.items()})
    assert info["modules"] == {"emb": {"lora_A": [4, 16], "lora_B": [8, 4], "r": 4},
                               "lin": {"lora_A": [4, 10], "lora_B": [20, 4], "r": 4}}
    assert info["other_tensors"] == {"head.weight": [2, 20]}
    assert info["parameters"] == {"lora": 64 + 32 + 40 + 80, "other": 40, "total": 256}


def test_merge_without_task_type_or_tokenizer_uses_the_config_architecture(tmp_path, monkeypatch, capsys):
    from peftlite import LoraConfig, get_lora_model
    tiny_gpt2().save_pretrained(tmp_path / "base")  # no tokenizer saved
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=2, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--model", "base", "--adapter", "adapter", "--output", "merged"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model_class"], result["tokenizer"]) == ("GPT2LMHeadModel", False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert not any(name.startswith(".peftlite-merge-") for name in os.listdir(tmp_path))


def test_a_hub_failure_while_pushing_is_one_line(work, trained, monkeypatch, capsys):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kw):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("401 Client Error: Unauthorized (invalid token)",
                             response=httpx2.Response(401, request=request))
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(SystemExit) as exited:
        main(["push", str(trained[0]), "me/tiny-lora"])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "401" in err
