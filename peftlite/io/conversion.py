"""PiSSA/OLoRA adapter → plain LoRA adapter on the original base (PEFT's weight conversion).

A PiSSA or OLoRA adapter trains on a residual base W_res = W − s·B₀·A₀. After
training the model computes W_res + s·B·A = W + s·(B·A − B₀·A₀), and that
update is exactly a plain LoRA of twice the rank on the *original* W:

    A' = [A; A₀] (2r × in),   B' = [B | −B₀] (out × 2r),   s' = s

(alpha doubles, or grows by √2 with rsLoRA, so that s' = s at rank 2r). This is
what PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
writes; A₀, B₀ come from the adapter saved right after initialisation.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..config import LoraConfig
from .keys import parse_file_key


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank 2r, the same scaling, a plain init."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion does not work with rank_pattern or alpha_pattern "
                         "together with use_rslora=True (nor in PEFT): expected one of them")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion does not work with use_dora=True: a DoRA "
                         "magnitude has no plain-LoRA equivalent")
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def converted_tensors(tensors: dict[str, Tensor], initial: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Each A and B (PEFT file keys) stacked with the initial ones: A' = [A; A₀], B' = [B | −B₀].

    Other tensors (modules_to_save, biases) are kept as they are. ValueError, naming
    `source`, when the initial adapter lacks a factor or has another shape.
    """
    out = {}
    for name, tensor in tensors.items():
        parsed = parse_file_key(name)
        if parsed is None:
            out[name] = tensor
            continue
        start = initial.get(name)
        if start is None or start.shape != tensor.shape:
            raise ValueError(f"{source}: the initial adapter has {None if start is None else tuple(start.shape)} "
                             f"for {name}, expected shape {tuple(tensor.shape)}: expected the adapter saved right "
                             "after initialisation")
        start = start.to(tensor.device, tensor.dtype)
        out[name] = torch.cat([tensor, start], dim=0) if parsed[1] == "lora_A" else torch.cat([tensor, -start], dim=1)
    return out
