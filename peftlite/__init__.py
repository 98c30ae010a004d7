"""peftlite: LoRA adapters for PyTorch and Hugging Face transformers, in PEFT's file format."""

from .config import LoraConfig
from .layers import Conv2d, Embedding, Linear, LoraLayer, MergedLinear, ModulesToSave
from .model import LoraModel, get_lora_model

__all__ = [
    "LoraConfig", "LoraModel", "get_lora_model",
    "LoraLayer", "Linear", "MergedLinear", "Embedding", "Conv2d", "ModulesToSave",
]
__version__ = "0.1.0"
