"""A LoraModel in transformers.Trainer: training, gradient checkpointing, adapter checkpoints, resume.

Run: .venv/bin/pytest tests/test_trainer.py -x -q

Every check compares against an independent run or reader: a checkpoint
must load in peftlite and in the real `peft` with the trained model's
outputs; a resumed run must end where the uninterrupted one did; a
checkpointed run must match the plain one; the eval loss must equal the
mean of the model's own batch losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_bert, tiny_gpt2, token_batch
from transformers import TrainingArguments

from peftlite import LoraConfig, LoraModel, get_lora_model
from peftlite.integrations import LoraTrainer


def lora_weights(model: LoraModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {f"{path}.{part}": layer.factors(adapter_name)[("lora_A", "lora_B").index(part)].detach().clone()
            for path, layer in model.lora_layers() if adapter_name in layer.adapters for part in ("lora_A", "lora_B")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def lm_data(n: int = 24, length: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(n, length, seed=1)
    return [{"input_ids": row, "labels": row} for row in ids]


def cls_data(n: int = 24, length: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(n, length, seed=2)
    # A learnable rule: the label is the first token's residue mod 3.
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row[0] % 3} for row in ids]


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                    learning_rate=5e-3, max_steps=6, save_strategy="no", logging_strategy="no",
                    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def gpt2_lora(seed: int = 0) -> LoraModel:
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                   task_type="CAUSAL_LM"))
    torch.manual_seed(seed)  # a different seed gives different LoRA A after wrapping
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.factors("default")[0], std=0.1)
    return model


def test_checkpoints_are_adapter_directories_that_peftlite_and_peft_load(tmp_path):
    model = gpt2_lora()
    LoraTrainer(model=model, args=training_args(tmp_path, save_strategy="steps", save_steps=3),
                train_dataset=lm_data()).train()
    checkpoint = tmp_path / "checkpoint-6"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files  # no copy of the frozen base model
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert any(w.abs().max() > 0 for k, w in lora_weights(model).items() if k.endswith("lora_B")), "nothing trained"

    ids = token_batch(2, 8, seed=9)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = LoraModel.from_pretrained(tiny_gpt2(), str(checkpoint)).eval()(input_ids=ids).logits
        in_peft = PeftModel.from_pretrained(tiny_gpt2(), str(checkpoint)).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_peft, expected, atol=1e-5, rtol=0)


def test_resume_from_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    straight = gpt2_lora(seed=0)
    LoraTrainer(model=straight, args=training_args(tmp_path / "a", save_strategy="steps", save_steps=3),
                train_dataset=lm_data()).train()

    resumed = gpt2_lora(seed=1)  # other starting weights: resume must overwrite them
    assert not torch.equal(*(next(iter(lora_weights(m).values())) for m in (straight, resumed)))
    trainer = LoraTrainer(model=resumed, args=training_args(tmp_path / "b"), train_dataset=lm_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    assert_same_weights(lora_weights(resumed), lora_weights(straight))


def test_resume_restores_every_adapter_of_the_checkpoint(tmp_path):
    model = gpt2_lora()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    LoraTrainer(model=model, args=training_args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2),
                train_dataset=lm_data()).train()
    assert (tmp_path / "a" / "checkpoint-2" / "other" / "adapter_model.safetensors").is_file()

    fresh = gpt2_lora(seed=1)
    fresh.add_adapter("other", LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights="gaussian"))
    LoraTrainer(model=fresh, args=training_args(tmp_path / "b", max_steps=2),
                train_dataset=lm_data()).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name in ("default", "other"):
        assert_same_weights(lora_weights(fresh, name), lora_weights(model, name))


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = gpt2_lora()
    trainer = LoraTrainer(model=model, args=training_args(
        tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # the worst is "best"
        learning_rate=1e-2), train_dataset=lm_data(), eval_dataset=lm_data(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), "the last checkpoint would prove nothing"
    assert_same_weights(lora_weights(model), lora_weights(LoraModel.from_pretrained(tiny_gpt2(), best)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, reentrant):
    runs = {}
    for checkpointing in (False, True):
        model = get_lora_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
        LoraTrainer(model=model, args=training_args(tmp_path / str(checkpointing), max_steps=4,
                                                    gradient_checkpointing=checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": reentrant}),
                    train_dataset=cls_data()).train()
        assert model.base_model.is_activation_checkpointing == checkpointing
        runs[checkpointing] = lora_weights(model)
    assert any(w.abs().max() > 0 for k, w in runs[True].items() if k.endswith("lora_B")), "nothing trained"
    assert_same_weights(runs[True], runs[False], atol=1e-5)


def test_evaluate_finds_the_labels_and_reports_the_models_loss(tmp_path):
    model = get_lora_model(tiny_bert(), LoraConfig(r=4, task_type="SEQ_CLS", init_lora_weights=False))
    data = cls_data(16)
    seen = {}

    def compute_metrics(prediction):
        seen["labels"] = prediction.label_ids
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = LoraTrainer(model=model, args=training_args(tmp_path), eval_dataset=data,
                          compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        batches = [data[i:i + 8] for i in range(0, 16, 8)]
        losses = [model(**{k: torch.stack([row[k] for row in b]) for k in b[0]}).loss for b in batches]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    assert seen["labels"].tolist() == [int(row["labels"]) for row in data]


DDP_WORKER = """
import os, sys, torch
from torch import nn
from transformers import TrainingArguments
from peftlite import LoraConfig, get_lora_model
from peftlite.integrations import LoraTrainer
from tiny_models import tiny_gpt2, token_batch

output_dir, batch_size = sys.argv[1], int(sys.argv[2])
model = get_lora_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="gaussian"))
for module in model.modules():
    if isinstance(module, nn.Dropout):
        module.p = 0.0  # ranks would draw other dropout masks than one process does
ids = token_batch(4, 8, seed=1)  # 4 rows = one global batch, so both setups average the same gradient
distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=3,
                         learning_rate=1e-2, save_strategy="steps", save_steps=3, logging_strategy="no",
                         report_to=[], use_cpu=True, ddp_backend="gloo" if distributed else None,
                         disable_tqdm=True, seed=0)
trainer = LoraTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
trainer.train()
weights = {f"{p}.{k}": l.factors("default")[("lora_A", "lora_B").index(k)].detach()
           for p, l in model.lora_layers() for k in ("lora_A", "lora_B")}
torch.save(weights, os.path.join(output_dir, f"rank{trainer.args.process_index}.pt"))
"""


@pytest.mark.xdist_group("distributed")  # beside tests/test_distributed.py, never at the same time: ports, cores
def test_ddp_on_two_cpu_processes_trains_the_same_adapter_as_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    tests_dir = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")])}
    for command, _output in ((["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(worker), str(tmp_path / "two"), "2"], "two"),
                            ([str(worker), str(tmp_path / "one"), "4"], "one")):
        done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    assert_same_weights(ranks[0], ranks[1], atol=0)
    assert_same_weights(ranks[0], one, atol=1e-5)
    assert any(w.abs().max() > 0 for k, w in one.items() if k.endswith("lora_B")), "nothing trained"
    checkpoint = tmp_path / "two" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    reloaded = LoraModel.from_pretrained(tiny_gpt2(), str(checkpoint))
    assert_same_weights(lora_weights(reloaded), ranks[0])


def test_a_model_without_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a peftlite LoraModel, got BertForSequenceClassification"):
        LoraTrainer(model=tiny_bert(), args=training_args(tmp_path))
