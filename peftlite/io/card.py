"""The README.md model card of a saved adapter, laid out and tagged as PEFT writes it.

A new card is huggingface_hub's default template (PEFT's layout) ending in a
"Framework versions" block; its front matter has `library_name: peft` (so the
Hub lists the adapter), PEFT's tags (`lora`, `transformers`,
`base_model:adapter:<id>`, the model's own `model_tags`), `pipeline_tag:
text-generation` for a causal LM, and `base_model` only when the base model
has a Hub id: PEFT also writes an empty string or a local path there, which
the Hub rejects. An existing card keeps its text; only its metadata is updated.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import PreTrainedModel

FRAMEWORK_HEADING = "### Framework versions"
FRAMEWORK_LINE = "- peftlite (PEFT's adapter format)"


def hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (`org/model`), None for nothing, a local path or anything else."""
    if not name or os.path.isabs(name) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _tags(base_model: str | None, model: nn.Module | None) -> list[str]:
    tags = set(getattr(model, "model_tags", None) or [])
    tags.add("lora")
    if isinstance(model, PreTrainedModel):
        tags.add("transformers")
    if base_model:
        tags.add("base_model:adapter:" + base_model)
    return sorted(tags)


def model_card(existing: Path, base_model: str | None, model: nn.Module | None = None,
               task_type: str | None = None) -> str | None:
    """The README.md text for an adapter of `model`; None (with a warning) to leave a broken card alone.

    An existing card whose front matter is not valid YAML is left as it is rather than overwritten.
    """
    if existing.is_file():
        try:
            card = ModelCard(existing.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
            warnings.warn(f"{existing}: front matter is not valid YAML ({err}); README.md left unchanged",
                          stacklevel=4)
            return None
    else:
        card = ModelCard.from_template(ModelCardData())
    base_model = hub_id(base_model)
    data = card.data
    data["library_name"] = "peft"
    if base_model:
        data["base_model"] = base_model
    data["tags"] = sorted(set(data.get("tags") or []) | set(_tags(base_model, model)))
    if not data.get("pipeline_tag") and task_type == "CAUSAL_LM":
        data["pipeline_tag"] = "text-generation"
    lines = card.text.splitlines()
    if FRAMEWORK_LINE not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, FRAMEWORK_LINE)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{FRAMEWORK_LINE}")
    card.text = "\n".join(lines)
    return str(card)
