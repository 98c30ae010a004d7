"""LoRA on the attention of a vision transformer: adapt a ViT trained on digits 0-4 to digits 5-9.

Offline and CPU-only, about a minute: scikit-learn's bundled `load_digits`
(1,797 8×8 images) is upsampled to 16×16 with 3 channels. A small
transformers ViT is first trained in full on digits 0-4 (the "pretrained"
model); then, frozen, it learns digits 5-9 two ways with the same budget:

- head only: the classifier is trained in full (a linear probe);
- LoRA: LoRA on the attention `q_proj`/`v_proj` projections plus the
  classifier in full (`modules_to_save=["classifier"]`).

The adapter is saved in PEFT's format, reloaded on a fresh copy of the
pretrained model, and merged; all three must score the same.

Run: .venv/bin/python examples/vit_digits.py
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import ViTConfig, ViTForImageClassification

from peftlite import LoraConfig, LoraModel, get_lora_model

torch.manual_seed(0)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 16, 16) images scaled to [-1, 1] and (N,) labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixel values 0..16
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return images, torch.tensor(digits.target)


def split(images, labels, classes, test_fraction=0.25):
    """Train/test split of the images whose label is in `classes`, labels renumbered 0..len-1."""
    keep = torch.isin(labels, torch.tensor(classes))
    x, y = images[keep], labels[keep] - min(classes)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * test_fraction)
    return (x[order[n_test:]], y[order[n_test:]]), (x[order[:n_test]], y[order[:n_test]])


def train(model, data, epochs, lr, batch_size=32):
    x, y = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(batch_size):
            loss = model(pixel_values=x[batch], labels=y[batch]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    return (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


images, labels = digit_images()
first, second = split(images, labels, [0, 1, 2, 3, 4]), split(images, labels, [5, 6, 7, 8, 9])

config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                   num_attention_heads=4, intermediate_size=128, num_labels=5)
pretrained = train(ViTForImageClassification(config), first[0], epochs=12, lr=1e-3)
print(f"pretrained ViT ({sum(p.numel() for p in pretrained.parameters()):,} params), digits 0-4: "
      f"test accuracy {accuracy(pretrained, first[1]):.3f}")
print(f"same model on digits 5-9 before adapting: {accuracy(pretrained, second[1]):.3f}")

probe = copy.deepcopy(pretrained).requires_grad_(False)
probe.classifier.requires_grad_(True)
probe = train(probe, second[0], epochs=12, lr=3e-3)
print(f"head only  ({trainable(probe):,} trainable): digits 5-9 test accuracy {accuracy(probe, second[1]):.3f}")

lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
model = train(get_lora_model(copy.deepcopy(pretrained), lora_config), second[0], epochs=12, lr=3e-3)
lora_accuracy = accuracy(model, second[1])
print(f"LoRA+head  ({trainable(model):,} trainable): digits 5-9 test accuracy {lora_accuracy:.3f}")

with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    reloaded = LoraModel.from_pretrained(copy.deepcopy(pretrained), directory).eval()
    merged = model.merge_and_unload()
    print(f"reloaded from {sorted(p.name for p in Path(directory).iterdir())}: "
          f"{accuracy(reloaded, second[1]):.3f}; merged into plain ViT: {accuracy(merged, second[1]):.3f}")
