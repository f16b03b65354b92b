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
    # fused and Conv1D projections
    "gpt2": ("gpt2", dict(num_attention_heads=4, n_inner=96, bos_token_id=1, eos_token_id=2)),  # Conv1D c_attn (stacked q|k|v), dropout after c_proj
    "phi3": ("phi3", dict(num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, sliding_window=None, partial_rotary_factor=0.5)),  # qkv_proj, gate_up_proj
    "gpt_neox": ("gpt_neox", dict(num_attention_heads=4, rotary_pct=0.5, bos_token_id=1, eos_token_id=2)),  # per-head [q k v] query_key_value
    # soft-capping, sliding windows, norms over all heads
    "gemma2": ("gemma2", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=6,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),  # eager only
    "gemma3": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention"])),  # MQA, hybrid sliding
    "mistral_window": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, sliding_window=5)),
    "qwen2_window": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=4, use_sliding_window=True,
                                   sliding_window=5, max_window_layers=1)),  # layer 1 slides, layer 0 does not
    "glm": ("glm", dict(num_attention_heads=8, num_key_value_heads=4, partial_rotary_factor=0.5, pad_token_id=0,
                        eos_token_id=[1, 2])),  # interleaved RoPE
    "olmo2": ("olmo2", dict(num_attention_heads=8, num_key_value_heads=4, eos_token_id=2)),  # q/k RMSNorm over all heads
}
ATTENTION = {"gemma2": "eager"}  # families without SDPA (soft-capping)


def config(family: str, **extra):
    model_type, overrides = FAMILIES[family]
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    return AutoConfig.for_model(model_type, **{**base, **overrides, **extra})


def model(family: str, attn=None, seed=0, **extra):
    attn = attn or ATTENTION.get(family, "sdpa")
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(family, **extra), attn_implementation=attn).eval()
    with torch.no_grad():  # random biases (HF initialises them to 0, which would hide a bias added twice)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return m


def prompt(batch=2, length=7, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
