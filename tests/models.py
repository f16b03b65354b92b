"""Tiny random HF models, one per supported family (fp32, seeded)."""

from __future__ import annotations

import torch
import transformers
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
    "opt": ("opt", dict(num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64)),  # positions from the mask
    # mixture of experts: 4 routed experts, top-2, expert intermediate 32 (ep and tpf up to 4)
    "mixtral": ("mixtral", dict(num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                                num_experts_per_tok=2, intermediate_size=32, sliding_window=None)),
    "qwen2_moe": ("qwen2_moe", dict(num_attention_heads=8, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48)),  # + gated shared expert
    "qwen3_moe": ("qwen3_moe", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_experts=4,
                                    num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(num_attention_heads=8, num_key_value_heads=8, num_experts=4, num_experts_per_tok=2,
                            intermediate_size=32, eos_token_id=2)),  # q/k norms over all heads
    # MoE structures of other families: experts stored transposed (E, in, out) (Aria); a dense first layer of a
    # '...MoeMLP' class (GLM-4-MoE); a shared MLP named shared_mlp (HunYuan); a custom elementwise gate (MiniMax-M3)
    "aria_text": ("aria_text", dict(num_attention_heads=8, num_key_value_heads=4, moe_num_experts=4, moe_topk=2,
                                    intermediate_size=32, moe_num_shared_experts=1)),
    "glm4_moe": ("glm4_moe", dict(num_attention_heads=8, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  n_shared_experts=1, head_dim=8)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(num_attention_heads=8, num_key_value_heads=4, num_experts=4, moe_topk=2,
                                              intermediate_size=32, head_dim=8)),
    "minimax_m3": ("minimax_m3_vl_text", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, rotary_dim=4,
                                              num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                              shared_intermediate_size=32, dense_intermediate_size=64)),
    "mixtral_bias": ("mixtral", dict(num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                                     num_experts_per_tok=2, intermediate_size=32, sliding_window=None)),  # + expert biases
    # MLA (one latent KV head) + MoE: grouped router with correction bias, shared expert, dense first layer
    "deepseek_v3": ("deepseek_v3", dict(num_attention_heads=8, num_key_value_heads=8, n_routed_experts=4,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                        moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=32,
                                        q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    "deepseek_v2": ("deepseek_v2", dict(num_attention_heads=8, num_key_value_heads=8, n_routed_experts=4,
                                        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                                        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    # fused and Conv1D projections
    "gpt2": ("gpt2", dict(num_attention_heads=4, n_inner=96, bos_token_id=1, eos_token_id=2)),  # Conv1D c_attn (stacked q|k|v), dropout after c_proj
    "phi3": ("phi3", dict(num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, sliding_window=None, partial_rotary_factor=0.5)),  # qkv_proj, gate_up_proj
    "moshi": ("moshi", dict(num_attention_heads=8, num_key_value_heads=4, ffn_dim=192)),  # gate_up cut by view(B, L, 2, -1)
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
    "bloom": ("bloom", dict(num_attention_heads=4)),  # ALiBi (baddbmm), per-head [q k v] cut by index; no SDPA
    # BERT-style post-norm layer as a causal LM: attention.self.{query,key,value} -> attention.output.dense ->
    # LayerNorm(x + residual); FFN split over the sibling modules intermediate.dense / output.dense
    "bert": ("bert", dict(num_attention_heads=4, is_decoder=True)),
    # eager-only, its attention merges heads by view(..., all_head_size): a constant width
    "megatron_bert": ("megatron-bert", dict(num_attention_heads=4, is_decoder=True)),
    # between the projections and attention, and between attention and o_proj (regions/heads.py)
    "laguna": ("laguna", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, gating="per-head",
                              mlp_layer_types=["dense", "dense"])),  # o = attn * softplus(g_proj(x)) per head
    "laguna_elem": ("laguna", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, gating="per-element",
                                   mlp_layer_types=["dense", "dense"])),  # the same gate per feature
    "bitnet": ("bitnet", dict(num_attention_heads=8, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)),  # RMSNorms over all heads / all of I
    "gpt_bigcode": ("gpt_bigcode", dict(num_attention_heads=4, n_inner=96, multi_query=True, bos_token_id=1,
                                            eos_token_id=2)),  # MQA: c_attn q|k|v uneven
    "stablelm": ("stablelm", dict(num_attention_heads=8, num_key_value_heads=4)),  # view(B, L, num_heads, D)
    "codegen": ("codegen", dict(num_attention_heads=8, rotary_dim=4, n_inner=96)),  # qkv as [q v k] per 2 heads
    "flint": ("flint", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)),  # sinks: cat([scores, s])
    "granite_swa": ("granite_swa", dict(num_attention_heads=8, num_key_value_heads=4)),  # sinks: sigmoid(lse - s)
    # eager scores masked by where(bias[:, :, S-L:S, :S], scores, min) (a tril buffer: implied by the causal mask)
    # plus the additive causal mask, scores not scaled; local layers are refused (regions/where_mask.py)
    "gpt_neo": ("gpt_neo", dict(num_attention_heads=4, attention_types=[[["global"], 2]], bos_token_id=1,
                                eos_token_id=2)),
    # sinks: softmax(cat([s, sink]) - row max)[..., :-1]; sliding + full layers; MoE: router with bias, experts
    # with biases and interleaved [g0 u0 g1 u1 ...] gate_up rows, clamp, (up + 1) * glu
    "gpt_oss": ("gpt_oss", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=6,
                                num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                layer_types=["sliding_attention", "full_attention"])),
    # kv-shared layers: layers 2, 3 read the caches of layers 0 (sliding) and 1 (full); per-layer inputs, AltUp,
    # LAuReL (left whole), the gaussian top-k activation sparsity of layer 0 (a std over the intermediate features)
    "gemma3n": ("gemma3n_text", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                                     num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                     num_kv_shared_layers=2, vocab_size_per_layer_input=97,
                                     hidden_size_per_layer_input=8, laurel_rank=8,
                                     activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0])),
    # full-attention layers with their own head_dim (global_head_dim) and one KV head whose values are the keys'
    # projection (attention_k_eq_v), kv-shared layers, per-layer inputs
    "gemma4": ("gemma4_text", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                   num_global_key_value_heads=1, attention_k_eq_v=True,
                                   sliding_window=6, num_hidden_layers=4, num_kv_shared_layers=2,
                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                   vocab_size_per_layer_input=97, hidden_size_per_layer_input=8)),
    # Llama 4: layer 0 chunked attention (chunks of 8 positions) with complex RoPE, L2 q/k norms and a dense FFN;
    # layer 1 full attention without RoPE, with temperature tuning, and MoE: dense experts stored (E, in, out), a
    # shared expert, a sigmoid router
    "llama4_text": ("llama4_text", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=4,
                                        interleave_moe_layer_step=2, intermediate_size=32, intermediate_size_mlp=96,
                                        num_local_experts=4, num_experts_per_tok=1, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2)),
    # KV heads that are not num_key_value_heads (layout.attention_shape): Falcon's multi-query cache (1 KV head; its
    # query_key_value viewed (B, L, Q+2, D) and cut by head index; FalconLinear: x @ W.T + b); Falcon-40B's new
    # decoder architecture ([q q k v] per KV group, each KV head broadcast over its group: the cache holds Q heads)
    "falcon": ("falcon", dict(num_attention_heads=4, multi_query=True, bias=True)),
    "falcon_40b": ("falcon", dict(num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    # MiMo-V2-Flash: values narrower than the keys (v_head_dim 8 < head_dim 16), its sliding layer (1) with twice
    # the KV heads and attention sinks, the row maximum subtracted from the scores; MoE layer 1 (no shared expert)
    # DiffLLaMA: two attention calls over one query, each over a half of the value heads (chunk + repeat of the
    # cache's values), combined o1 - lambda * o2 across query heads h and h + Q/2, a groupnorm over each pair
    "diffllama": ("diffllama", dict(num_attention_heads=8, num_key_value_heads=4)),
    "mimo": ("mimo_v2_flash", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, v_head_dim=8,
                                   sliding_window=6, n_routed_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32)),
    # ALiBi added to eager matmul scores, cut to the cache's keys (alibi[:, q:, S0:]), then masked_fill by the
    # causal mask; its query cut max(0, 1 - seq_length - cache.get_seq_length()) reads the host length
    "mpt": ("mpt", dict(n_heads=4, d_model=64, n_layers=2, expansion_ratio=2, max_seq_len=256,
                        use_cache=True)),  # MptConfig defaults to use_cache=False: generate would not slice
    # GIT used as a text-only causal LM: positions position_ids[:, length:] and its image branch `length > 0` from
    # cache.get_seq_length() as a Python int; token types zeros_like(embeddings) in its mask; a small vision tower
    "git": ("git", dict(num_attention_heads=4, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=1, num_attention_heads=2,
                                                                  image_size=32, patch_size=16))),
    # positions from cache.get_seq_length() as a Python int (learned embedding at arange(length, length + L) + 2,
    # cache.HOST_LENGTH); scaled embeddings, layernorm_embedding, post-norm layers
    "trocr": ("trocr", dict(decoder_attention_heads=4, decoder_ffn_dim=96, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2)),
    # sinusoidal positions at arange(length, length + L) (cache.HOST_LENGTH), rotated per head by interleaved
    # rotate-half: stack([-x[..., 1::2], x[..., ::2]], -1).reshape_as(x) (regions/rope.py); BERT-style post-norm
    "roformer": ("roformer", dict(num_attention_heads=4, is_decoder=True)),
}
ATTENTION = {"gemma2": "eager", "bloom": "eager", "megatron_bert": "eager", "flint": "eager",  # without SDPA
             "granite_swa": "eager", "mimo": "eager", "gpt_oss": "eager", "gpt_neo": "eager",  # (soft-capping, BLOOM,
             "trocr": "eager", "mpt": "eager", "git": "eager",  # MegatronBERT, sinks, TrOCR, MPT, GIT,
             "roformer": "eager"}  # RoFormer)
# transformers before 5.24 (pyproject's range starts at 5.17): CodeGen has no SDPA attention; Moshi builds no causal
# mask and GIT's bare call is not traceable without the attention_mask that generate passes (helix refuses Moshi's
# maskless attention), so they are called as generate calls them (verify.generate_inputs); Flint does not exist.
TRANSFORMERS = tuple(int(v) for v in transformers.__version__.split(".")[:2])
OLD_TRANSFORMERS = TRANSFORMERS < (5, 24)
if OLD_TRANSFORMERS:
    ATTENTION["codegen"] = "eager"
CALL = {"moshi": "generate", "git": "generate"} if OLD_TRANSFORMERS else {}


def available(family: str) -> bool:
    """Whether the installed transformers knows the family's model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return FAMILIES[family][0] in CONFIG_MAPPING_NAMES


def refusal(family: str) -> str | None:
    """The reason helix refuses the family with the installed transformers (cache.NEEDS_TRANSFORMERS), or None."""
    from helix_compile.cache import NEEDS_TRANSFORMERS

    need = NEEDS_TRANSFORMERS.get(FAMILIES[family][0])
    if need and TRANSFORMERS < tuple(int(v) for v in need[0].split(".")):
        return need[1]
    return None


def runs_here(family: str) -> bool:
    """Whether the family runs under helix with the installed transformers. A family it does not know is skipped
    (printed); one that helix refuses on this version (cache.NEEDS_TRANSFORMERS) must be refused by StaticCache
    with an error naming the transformers version."""
    import pytest

    from helix_compile import Layout, StaticCache

    if not available(family):
        print(f"{family}: not in transformers {transformers.__version__}, skipped")
        return False
    if refusal(family) is None:
        return True
    with pytest.raises(ValueError, match=f"with transformers {transformers.__version__}: "):
        StaticCache(config(family), 1, 8, Layout(1))
    print(f"{family}: refused with transformers {transformers.__version__} ({refusal(family)})")
    return False


EXPERT_BIASES = {"mixtral_bias"}  # routed experts given gate_up / down biases (gpt-oss's has_bias=True layout)


def config(family: str, **extra):
    model_type, overrides = FAMILIES[family]
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    return AutoConfig.for_model(model_type, **{**base, **overrides, **extra})


def model(family: str, attn=None, seed=0, experts=None, **extra):
    """``experts``: transformers' experts implementation of MoE families ("grouped_mm", default, or "batched_mm")."""
    attn = attn or ATTENTION.get(family, "sdpa")
    torch.manual_seed(seed)
    kw = {} if experts is None else {"experts_implementation": experts}
    m = AutoModelForCausalLM.from_config(config(family, **extra), attn_implementation=attn, **kw).eval()
    if family in EXPERT_BIASES:  # what transformers' has_bias=True experts hold; randomised below
        for layer in m.model.layers:
            experts = layer.mlp.experts
            experts.has_bias = True
            experts.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(experts.gate_up_proj.shape[:2]))
            experts.down_proj_bias = torch.nn.Parameter(torch.zeros(experts.down_proj.shape[:2]))
    with torch.no_grad():  # random biases (HF initialises them to 0, which would hide a bias added twice)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router bias (a buffer, zeros by default)
                b.normal_(0, 0.5)
    return m


def prompt(batch=2, length=7, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
