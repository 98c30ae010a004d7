"""QLoRA: a causal LM loaded in 4-bit (nf4, double quantization) learns a small task with LoRA, on CPU.

Offline, under a minute of CPU time. A tiny Llama is built from a config and saved (no Hub), then
loaded the way QLoRA loads a real checkpoint: `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` with `device_map="cpu"`
(bitsandbytes runs its 4-bit kernels on CPU). `prepare_model_for_kbit_training` readies
it, and LoRA on every linear layer teaches it to count: after "7 8 9" comes "10", modulo
the vocabulary. The packed 4-bit weights never change; only A and B train.
Reported: the loss on held-out sequences before and after, a greedy continuation, the
adapter reloaded from disk on a fresh 4-bit base, and `dequantize_and_merge`'s float model.

Run: .venv/bin/python examples/qlora_causal_lm.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from peftlite import LoraConfig, LoraModel, dequantize_and_merge, get_lora_model, prepare_model_for_kbit_training

VOCAB, LENGTH = 64, 16
QUANTIZATION = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
torch.manual_seed(0)
warnings.filterwarnings("ignore", module="transformers")


def counting(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, LENGTH) ids, each row counting up by one from a random start, modulo VOCAB."""
    starts = torch.randint(0, VOCAB, (batch_size, 1), generator=generator)
    return (starts + torch.arange(LENGTH)) % VOCAB


def loss_on(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def load_4bit(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATION, device_map="cpu")


held_out = counting(64, torch.Generator().manual_seed(1))
with tempfile.TemporaryDirectory() as tmp:
    base_path, adapter_path = Path(tmp) / "base", Path(tmp) / "adapter"
    # initializer_range 0.1: with the head and final norm frozen, their scale bounds how sure the model can get
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=LENGTH,
                                 initializer_range=0.1, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(base_path)

    base = prepare_model_for_kbit_training(load_4bit(base_path), use_gradient_checkpointing=False)
    model = get_lora_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    packed = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    uniform = torch.log(torch.tensor(float(VOCAB)))
    print(f"held-out loss before: {loss_on(model.train(), held_out):.3f} (a uniform guess: {uniform:.3f})")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(200):
        batch = counting(16, generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 49:
            print(f"  step {step + 1}: held-out loss {loss_on(model, held_out):.3f}")
    trained_loss = loss_on(model, held_out)
    print(f"held-out loss after:  {trained_loss:.3f}")
    after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    print(f"packed 4-bit weight unchanged by training: {torch.equal(after, packed)}")

    model.eval()
    prompt = torch.tensor([[40, 41, 42]])
    with torch.no_grad():
        continuation = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    print("greedy continuation of 40 41 42:", continuation[0, 3:].tolist())

    model.save_pretrained(adapter_path)
    reloaded = LoraModel.from_pretrained(load_4bit(base_path), str(adapter_path)).train()
    print(f"adapter reloaded on a fresh 4-bit base: loss {loss_on(reloaded, held_out):.3f}")
    plain = dequantize_and_merge(reloaded).train()
    left = sum(type(m).__name__ == "Linear4bit" for m in plain.modules())
    print(f"dequantize_and_merge: a float {type(plain).__name__} ({left} 4-bit layers left), "
          f"loss {loss_on(plain, held_out):.3f}")
