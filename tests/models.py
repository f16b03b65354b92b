"""Tiny random HF models, one per supported family (fp32, seeded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# kind -> (model_type, config overrides)
FAMILIES = {
    "llama": ("llama", dict(num_attention_heads=8, num_key_value_heads=4)),  # GQA
    "qwen2": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=4)),  # GQA, q/k/v bias
    "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, sliding_window=None)),  # GQA
    "phi": ("phi", dict(num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5)),  # MHA, biases
    "mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),  # MQA
    "qwen3": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)),  # per-head q/k RMSNorm
    "gemma": ("gemma", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),  # MQA family
    "olmo": ("olmo", dict(num_attention_heads=4, num_key_value_heads=4)),  # MHA family
    "granite": ("granite", dict(num_attention_heads=8, num_key_value_heads=4)),  # scaled residuals
}


def config(family: str, **extra):
    model_type, overrides = FAMILIES[family]
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    return AutoConfig.for_model(model_type, **{**base, **overrides, **extra})


def model(family: str, attn="sdpa", seed=0, **extra):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(family, **extra), attn_implementation=attn).eval()
    with torch.no_grad():  # random biases (HF initialises them to 0, which would hide a bias added twice)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return m


def prompt(batch=2, length=7, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
