"""The README.md model card of a saved adapter: `library_name: peft`, so the Hub lists it as an adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData


def model_card(existing: Path, base_model: str | None) -> str | None:
    """README.md with `library_name: peft` (so the Hub lists an adapter) and `base_model` front matter.

    An existing card keeps its text; only its metadata is updated. One whose
    front matter is not valid YAML is left alone (None, with a warning)
    rather than overwritten.
    """
    if existing.is_file():
        try:
            card = ModelCard(existing.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
            warnings.warn(f"{existing}: front matter is not valid YAML ({err}); README.md left unchanged",
                          stacklevel=4)
            return None
    else:
        card = ModelCard("---\nlibrary_name: peft\n---\n\n# LoRA adapter\n\nA LoRA adapter in PEFT's format, "
                         "saved by peftlite. Load it with `peftlite.LoraModel.from_pretrained(model, path)` "
                         "or `peft.PeftModel.from_pretrained(model, path)`.\n")
    data: ModelCardData = card.data
    data.library_name = "peft"
    if base_model:
        data.base_model = base_model
    tags = list(data.tags or [])
    for tag in (["base_model:adapter:" + base_model] if base_model else []) + ["lora", "peftlite"]:
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    return str(card)
