"""Tiny models for tests: real transformers architectures with random weights, plus plain PyTorch modules.

Shared by every test file so each builds the same small shapes; all run in
well under a second on CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        vocab_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_vit(seed: int = 0, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


class MLP(nn.Module):
    """A plain PyTorch model: no config, no transformers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    """Embedding + Conv2d + Linear, to reach every layer kind in one plain model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(16, 8)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8 * 4 * 4 + 8, 4)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        features = self.conv(image).flatten(1)
        return self.head(torch.cat([features, self.emb(ids).mean(1)], dim=-1))


def token_batch(batch: int = 2, length: int = 8, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_lora_to_peft(lite_model, peft_model, adapter_name: str = "default") -> None:
    """Give a peft model the same LoRA weights (and modules_to_save copies) as a peftlite model (same module paths)."""
    for path, layer in lite_model.lora_layers():
        if adapter_name not in layer.adapters:  # an adapter may cover only some of the wrapped layers
            continue
        lora_A, lora_B = layer.factors(adapter_name)
        peft_layer = peft_model.base_model.model.get_submodule(path)
        if hasattr(peft_layer, "lora_embedding_A") and adapter_name in peft_layer.lora_embedding_A:
            peft_layer.lora_embedding_A[adapter_name].data.copy_(lora_A)
            peft_layer.lora_embedding_B[adapter_name].data.copy_(lora_B)
        else:
            peft_layer.lora_A[adapter_name].weight.data.copy_(lora_A)
            peft_layer.lora_B[adapter_name].weight.data.copy_(lora_B)
    for path, module in lite_model.saved_modules():
        if adapter_name in module.modules_to_save:
            peft_wrapper = peft_model.base_model.model.get_submodule(path)
            peft_wrapper.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[adapter_name].state_dict())


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Everything a failed call must leave as it was: module types by path, every parameter and buffer
    (values, requires_grad), and for a LoraModel its configs, active adapter and merge state.

    Compare two fingerprints with `assert_same_fingerprint` (bit-exact, not approximate).
    """
    lora_state = {}
    if hasattr(model, "adapter_state"):
        state = model.adapter_state
        lora_state = {"configs": dict(model.peft_config), "active": state.active, "disabled": state.disabled,
                       "merged_count": state.merged_count,
                       "merged": {path: list(layer.merged_adapters) for path, layer in model.lora_layers()}}
    return {
        "modules": [(path, type(module).__name__) for path, module in model.named_modules()],
        "params": {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "state": lora_state,
    }


def assert_same_fingerprint(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["state"] == before["state"]
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys(), kind
        for name, old in before[kind].items():
            new = after[kind][name]
            if kind == "params":
                assert new[1] == old[1], f"requires_grad of {name} changed"
                old, new = old[0], new[0]
            # bit-exact; a NaN that was there before counts as unchanged
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{kind[:-1]} {name} changed: {m}")


def tiny_word_tokenizer(words: list[str]):
    """A whitespace word-level fast tokenizer for the tiny models: [PAD]=0, [EOS]=1, [UNK]=2, then `words`.

    Saved with `save_pretrained` next to a tiny model, `AutoTokenizer.from_pretrained` loads it offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")
