"""GPT-2 causal LM with LoRA on the fused `c_attn` (q and v only: `enable_lora=[True, False, True]`).

Offline and CPU-only, a few minutes. A small word-level GPT-2 is first
trained in full on 1,000 AG News items (the "pretrained" model). Then LoRA
on the q and v slices of every fused QKV projection (a MergedLinear,
computed as one grouped op) teaches it a task that lives in attention:
echoing, every word said twice ("oil oil prices prices"), which needs a
look back at the previous token. Reported: held-out perplexity on plain
and echoed text before and after, and samples from the base, the
adapter, the adapter reloaded from disk and the merged model.
Data: tests/data/ag_news_*_small.csv (source in tests/data/README.md).

Run: .venv/bin/python examples/gpt2_causal_lm.py
"""

from __future__ import annotations

import copy
import csv
import math
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from peftlite import LoraConfig, LoraModel, get_lora_model

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
BLOCK = 32
torch.manual_seed(0)


def texts(split: str) -> str:
    with open(DATA / f"ag_news_{split}_small.csv", newline="") as f:
        return "\n".join(r["text"] for r in csv.DictReader(f))


corpora = {split: texts(split) for split in ("train", "test")}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]|\n", text.lower())


# Word-level vocabulary: the words seen 3 times or more in the training text; the rest read as <unk>.
counts = Counter(words(corpora["train"]))
vocab = ["<unk>", "\n"] + sorted(w for w, n in counts.items() if n >= 3 and w != "\n")
index = {w: i for i, w in enumerate(vocab)}


def encode(text: str, echo: bool = False) -> torch.Tensor:
    """Token ids; `echo` says every word twice ("the the market market"): the adapter's task."""
    ids = torch.tensor([index.get(w, 0) for w in words(text)])
    return ids.repeat_interleave(2) if echo else ids


def decode(ids: torch.Tensor) -> str:
    return " ".join(vocab[i] for i in ids.tolist())


def batches(ids: torch.Tensor, steps: int, batch_size: int = 32):
    """`steps` batches of random BLOCK-token windows of `ids`: (batch_size, BLOCK)."""
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - BLOCK, (batch_size,))
        yield torch.stack([ids[s:s + BLOCK] for s in starts])


def train(model, ids: torch.Tensor, steps: int, lr: float):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in batches(ids, steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """Per-token perplexity over consecutive BLOCK windows of `ids`."""
    windows = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    return math.exp(model(input_ids=windows, labels=windows).loss.item())


@torch.no_grad()
def sample(model, prompt: str, length: int = 16) -> str:
    """Top-10 sampling from the same seed, so every model draws the same random numbers."""
    torch.manual_seed(0)
    ids = encode(prompt).unsqueeze(0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                         do_sample=True, top_k=10, pad_token_id=index["\n"], bad_words_ids=[[index["<unk>"]]])
    return decode(out[0]).replace("\n", " / ")


config = GPT2Config(vocab_size=len(vocab), n_positions=BLOCK, n_embd=96, n_layer=3, n_head=4,
                    bos_token_id=index["\n"], eos_token_id=index["\n"])
pretrained = train(GPT2LMHeadModel(config), encode(corpora["train"]), steps=300, lr=3e-3)
print(f"pretrained word-level GPT-2 ({sum(p.numel() for p in pretrained.parameters()):,} params, "
      f"{len(vocab):,} words) on {len(encode(corpora['train'])):,} words of news")
held_out = {"plain": encode(corpora["test"]), "echoed": encode(corpora["test"], echo=True)}


def report(name: str, model) -> None:
    print(f"{name:<6} held-out perplexity: plain text {perplexity(model, held_out['plain']):7.2f}, "
          f"echoed text {perplexity(model, held_out['echoed']):7.2f}")


report("base", pretrained)
lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], enable_lora=[True, False, True],
                         task_type="CAUSAL_LM")
model = get_lora_model(copy.deepcopy(pretrained), lora_config)
model.print_trainable_parameters()
train(model, encode(corpora["train"], echo=True), steps=200, lr=1e-2)
report("LoRA", model)

prompt = "oil prices"
print(f"base    : {sample(pretrained, prompt)}")
print(f"LoRA    : {sample(model, prompt)}")
with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    reloaded = LoraModel.from_pretrained(copy.deepcopy(pretrained), directory).eval()
    print(f"reloaded: {sample(reloaded, prompt)}")
print(f"merged  : {sample(model.merge_and_unload(), prompt)}")
