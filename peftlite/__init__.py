"""peftlite: LoRA adapters for PyTorch and Hugging Face transformers, in PEFT's file format.

A drop-in for PEFT's LoRA: `from peftlite import LoraConfig, get_peft_model, PeftModel`
in place of `from peft import ...`. The package is layered one way, each folder
importing only those before it: config and targets, the reference math
(functional), the fused path (fast), variants, layers, the tuner, files and the
Hub (io), the user-facing model (peft_model), then the app (cli, training, demo).
"""

from .config import LoraConfig
from .io.state_dict import (
                            get_base_model_state_dict,
                            get_peft_model_state_dict,
                            set_base_model_state_dict,
                            set_peft_model_state_dict,
)
from .layers import (
                            Conv1d,
                            Conv2d,
                            Conv3d,
                            Embedding,
                            Linear,
                            LoraLayer,
                            MergedLinear,
                            ModulesToSave,
)
from .peft_model import LoraModel, get_lora_model, inject_adapter_in_model
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuner import LoraTuner
from .tuner.kbit import dequantize_and_merge, prepare_model_for_kbit_training

PeftModel = LoraModel
get_peft_model = get_lora_model

__all__ = [
    "LoraConfig", "LoraModel", "get_lora_model", "PeftModel", "get_peft_model", "LoraTuner",
    "inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict",
    "get_layer_status", "get_model_status", "TunerLayerStatus", "TunerModelStatus",
    "get_base_model_state_dict", "set_base_model_state_dict",
    "LoraLayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "ModulesToSave",
    "prepare_model_for_kbit_training", "dequantize_and_merge",
]
__version__ = "0.2.0"
