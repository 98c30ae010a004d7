"""Whether a saved adapter loads in PEFT 0.21 unchanged, and why not: what `peftlite inspect` reports.

peftlite reads every adapter PEFT writes, and a few PEFT cannot: seed-era
fused-QKV files (legacy.py) and loralib's factor names. It also writes two
fields of its own that PEFT ignores with a warning. This reads the files as
they are on disk (no conversion) and lists each such finding, so a user knows
before sharing an adapter whether a PEFT user can load it, and what to do.
"""

from __future__ import annotations

from typing import Any

from ..config import CONFIG_NAME, read_json
from ..storage import hub
from .files import read_weights
from .legacy import LEGACY_SUFFIXES, fused_layout, read_legacy_names

# Fields peftlite writes that PEFT's LoraConfig lacks: PEFT drops them on load, with a warning.
PEFTLITE_FIELDS = {
    "enable_lora": "PEFT ignores it: the weights are already PEFT's equivalent plain LoRA (block-diagonal B), "
                   "so outputs are the same",
    "merge_weights": "PEFT ignores it: model.eval() does not merge the adapter there (outputs are the same)",
}


def peft_compatibility(model_id_or_path: str, **hub_kwargs: Any) -> dict[str, Any]:
    """{"loads_in_peft_unchanged": bool, "blocking": [why not], "notes": [what PEFT drops]}."""
    config = read_json(hub.resolve(model_id_or_path, CONFIG_NAME, **hub_kwargs))
    tensors, source = read_weights(model_id_or_path, **hub_kwargs)
    blocking, notes = [], []
    loralib_names = sorted(k for k in tensors if any(k.endswith(s) for s in LEGACY_SUFFIXES))
    if loralib_names:
        blocking.append(f"loralib factor names ({loralib_names[0]!r}, ...): PEFT expects '.lora_A.weight' / "
                        "'.lora_B.weight'; load it in peftlite and save_pretrained to rewrite them")
    layout = fused_layout(config, read_legacy_names(tensors), source)
    if layout == "legacy":
        blocking.append("legacy fused-QKV layout (PEFT 0.2/0.3, loralib): enable_lora with r per enabled slice and "
                        "lora_B (g·out_slice, r); PEFT 0.21 ignores enable_lora and fails on the shapes. Load it "
                        "in peftlite and save_pretrained to write PEFT's plain layout (rank g·r)")
    for field, why in PEFTLITE_FIELDS.items():
        if config.get(field) not in (None, False) and not (field == "enable_lora" and layout == "legacy"):
            notes.append(f"{field}={config[field]!r}: {why}")
    return {"loads_in_peft_unchanged": not blocking, "blocking": blocking, "notes": notes}
