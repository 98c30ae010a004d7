"""The tuner layer: finding targets, injecting adapters, and PEFT's `LoraModel` (here `LoraTuner`)."""

from ..layers.walk import lora_layers, saved_modules
from .inject import Plan, plan_adapter, plan_layers
from .targets import find_modules_to_save, find_targets
from .tuner import LoraTuner, batch_size_of, fast_path_default

__all__ = ["LoraTuner", "Plan", "plan_adapter", "plan_layers", "lora_layers", "saved_modules", "find_targets",
           "find_modules_to_save", "batch_size_of", "fast_path_default"]
