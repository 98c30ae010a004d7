"""`LoraTrainer`: transformers' Trainer for a LoraModel, with adapter directories as checkpoints.

transformers' Trainer (checked against 5.23) recognises a `PreTrainedModel` or
a `PeftModel` by `isinstance`; any other `nn.Module`, LoraModel included, is a
bare module to it, and three things then go wrong:

1. it reads the model's `forward` signature to choose which dataset columns
   to keep and which are labels. LoraModel's is `(*args, **kwargs)`, so
   `input_ids` is dropped and no label is found (eval reports no loss);
2. a checkpoint is the whole state dict in `model.safetensors`: the frozen
   base model again at every save, and a crash on tied weights such as
   GPT-2's `wte`/`lm_head`;
3. resume and `load_best_model_at_end` read that file back.

`LoraTrainer` overrides exactly these three: it reads the base model's
signature, saves with `LoraModel.save_pretrained` (a directory that
`LoraModel.from_pretrained` and PEFT both load), and loads a checkpoint with
`hotswap_adapter`, which copies into the existing parameters so the
optimizer's references stay valid. Everything else (gradient checkpointing,
DDP, optimizer/scheduler/RNG state in the checkpoint) is the Trainer's own.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from .peft_model import LoraModel


class LoraTrainer(Trainer):
    """A `transformers.Trainer` whose model is a `LoraModel`; takes the same arguments as Trainer.

    Raises:
        ValueError: the model is not a LoraModel, or FSDP/DeepSpeed is on (their
            sharded parameters are not what `save_pretrained` reads; use
            `peftlite train` under accelerate for FSDP).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.lora_model, LoraModel):
            raise ValueError(f"LoraTrainer needs a peftlite LoraModel, got {type(self.lora_model).__name__}: "
                             "wrap the model with get_lora_model first")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("LoraTrainer does not support FSDP or DeepSpeed: expected single-process or DDP "
                             "training (for FSDP use `peftlite train` under accelerate)")
        base_class = type(self.lora_model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)

    @property
    def lora_model(self) -> LoraModel:
        """The LoraModel itself, outside any DDP or compile wrapper."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _set_signature_columns_if_needed(self) -> None:
        # Dataset columns are kept when the *base* model's forward takes them.
        if self._signature_columns is None:
            columns = inspect.signature(self.lora_model.get_base_model().forward).parameters
            self._signature_columns = list(columns) + sorted({"label", "label_ids", *self.label_names})  # type: ignore[assignment]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write an adapter directory (plus tokenizer and training args, as Trainer does)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or output_dir is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.lora_model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Copy every adapter's weights from `resume_from_checkpoint` into the model, in place.

        "default" is read from the directory itself, any other adapter from
        the subfolder of its name, as `save_pretrained` wrote them.
        """
        lora_model = self.lora_model if model is None else self.accelerator.unwrap_model(model)
        for name in lora_model.peft_config:
            directory = resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            lora_model.hotswap_adapter(directory, name)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
