"""The model shapes the cost model needs, from a preset, an HF `config.json`, a dict or a PretrainedConfig."""
from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int  # H
    layers: int
    q_heads: int  # Q
    kv_heads: int  # K (1 for MLA: the cached latent is one shared "head")
    head_dim: int  # Hsz
    ffn: int  # F of dense layers (SwiGLU: 3*H*F weights)
    vocab: int
    tie_embeddings: bool = False
    # MoE (experts == 0: dense)
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # total intermediate size of the shared experts
    dense_layers: int = 0  # leading dense layers of a MoE model (DeepSeek first_k_dense_replace)
    # MLA (kv_lora == 0: GQA/MHA)
    kv_lora: int = 0
    q_lora: int = 0
    rope_dim: int = 0
    nope_dim: int = 0
    v_dim: int = 0
    head_parts: int = 1  # query head h pairs with h + Q/p (DiffLLaMA: 2), as layout.attention_shape gives it

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def params(self) -> float:
        """Total parameters (for the report; the cost model counts per GPU)."""
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        dense = (self.layers - self.moe_layers) * ffn_params(self, moe=False)
        moe = self.moe_layers * ffn_params(self, moe=True)
        return emb + self.layers * attention_params(self) + dense + moe


def attention_params(m: ModelSpec, q_loc=None, k_loc=None, o_heads=None) -> float:
    """Attention weights held (and read) by one GPU with q_loc query and k_loc KV heads and the W_o columns of
    o_heads query heads."""
    q_loc = m.q_heads if q_loc is None else q_loc
    k_loc = m.kv_heads if k_loc is None else k_loc
    o_heads = m.q_heads if o_heads is None else o_heads
    H = m.hidden
    if m.is_mla:
        qk = m.nope_dim + m.rope_dim
        q = H * m.q_lora + m.q_lora * q_loc * qk if m.q_lora else H * q_loc * qk
        kv = H * (m.kv_lora + m.rope_dim) + m.kv_lora * q_loc * (m.nope_dim + m.v_dim)
        return q + kv + o_heads * m.v_dim * H
    return H * q_loc * m.head_dim + 2 * H * k_loc * m.head_dim + o_heads * m.head_dim * H


def ffn_params(m: ModelSpec, moe: bool) -> float:
    """All FFN weights of one layer (one copy)."""
    if not moe:
        return 3 * m.hidden * m.ffn
    return m.experts * 3 * m.hidden * m.expert_ffn + 3 * m.hidden * m.shared_ffn + m.hidden * m.experts


PRESETS = {
    # The paper's two models.
    "llama-3.1-405b": ModelSpec("llama-3.1-405b", hidden=16384, layers=126, q_heads=128, kv_heads=8, head_dim=128,
                                ffn=53248, vocab=128256),
    "deepseek-r1": ModelSpec("deepseek-r1", hidden=7168, layers=61, q_heads=128, kv_heads=1, head_dim=192,
                             ffn=18432, vocab=129280, experts=256, top_k=8, expert_ffn=2048, shared_ffn=2048,
                             dense_layers=3, kv_lora=512, q_lora=1536, rope_dim=64, nope_dim=128, v_dim=128),
    "qwen3-235b-a22b": ModelSpec("qwen3-235b-a22b", hidden=4096, layers=94, q_heads=64, kv_heads=4, head_dim=128,
                                 ffn=12288, vocab=151936, experts=128, top_k=8, expert_ffn=1536),
    # Benchmark-sized models that fit our 4-GPU machines.
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", hidden=4096, layers=32, q_heads=32, kv_heads=8, head_dim=128,
                              ffn=14336, vocab=128256),
    "llama-3.1-70b": ModelSpec("llama-3.1-70b", hidden=8192, layers=80, q_heads=64, kv_heads=8, head_dim=128,
                               ffn=28672, vocab=128256),
    "qwen3-8b": ModelSpec("qwen3-8b", hidden=4096, layers=36, q_heads=32, kv_heads=8, head_dim=128, ffn=12288,
                          vocab=151936),
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", hidden=2048, layers=48, q_heads=32, kv_heads=4, head_dim=128,
                               ffn=6144, vocab=151936, experts=128, top_k=8, expert_ffn=768),
    "deepseek-v2-lite": ModelSpec("deepseek-v2-lite", hidden=2048, layers=27, q_heads=16, kv_heads=1, head_dim=192,
                                  ffn=10944, vocab=102400, experts=64, top_k=6, expert_ffn=1408, shared_ffn=2816,
                                  dense_layers=1, kv_lora=512, q_lora=0, rope_dim=64, nope_dim=128, v_dim=128),
}
# The paper's Figure 1 model: "Llama-405B-like" with F = 65536 (Appendix A).
FIGURE1_MODEL = replace(PRESETS["llama-3.1-405b"], name="figure1-llama-405b-like", ffn=65536)
ALIASES = {"llama-405b": "llama-3.1-405b", "llama3-405b": "llama-3.1-405b", "deepseek-v3": "deepseek-r1",
           "r1": "deepseek-r1", "llama-8b": "llama-3.1-8b", "llama-70b": "llama-3.1-70b", "qwen3-235b": "qwen3-235b-a22b",
           "qwen3-30b": "qwen3-30b-a3b"}


def _get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def from_config(cfg, name: str = "config") -> ModelSpec:
    """A ModelSpec from an HF config (dict or PretrainedConfig). Llama/Qwen/Mistral/Mixtral/DeepSeek families."""
    if not isinstance(cfg, dict):
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        name = getattr(cfg, "name_or_path", None) or getattr(cfg, "model_type", name) or name
    elif "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if _get(cfg, k) is None]
    if missing:
        raise ValueError(f"config {name!r} lacks {', '.join(missing)}: not a decoder-only HF config the planner knows")
    H = int(_get(cfg, "hidden_size"))
    Q = int(_get(cfg, "num_attention_heads"))
    K = int(_get(cfg, "num_key_value_heads", default=Q))
    head_dim = int(_get(cfg, "head_dim", default=H // Q))
    parts = 1
    if not int(_get(cfg, "kv_lora_rank", default=0) or 0):  # the KV heads the model builds (Falcon's multi-query)
        from ..layout import attention_shape

        view = types.SimpleNamespace(**cfg) if isinstance(cfg, dict) else cfg
        shapes = [attention_shape(view, i) for i in range(int(_get(cfg, "num_hidden_layers")))]
        K, parts = min(s.k for s in shapes), max(s.parts for s in shapes)
    ffn = int(_get(cfg, "intermediate_size", default=4 * H))
    experts = int(_get(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0) or 0)
    kv_lora = int(_get(cfg, "kv_lora_rank", default=0) or 0)
    spec = dict(name=str(name), hidden=H, layers=int(_get(cfg, "num_hidden_layers")), q_heads=Q, kv_heads=K,
                head_dim=head_dim, ffn=ffn, vocab=int(_get(cfg, "vocab_size", default=32000)),
                tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)), head_parts=parts)
    if experts:
        expert_ffn = int(_get(cfg, "moe_intermediate_size", default=ffn))
        shared = int(_get(cfg, "n_shared_experts", default=0) or 0) * expert_ffn
        shared = int(_get(cfg, "shared_expert_intermediate_size", default=shared) or 0)
        dense = int(_get(cfg, "first_k_dense_replace", default=0) or 0)
        only = _get(cfg, "mlp_only_layers", default=[]) or []
        spec.update(experts=experts, top_k=int(_get(cfg, "num_experts_per_tok", default=2)), expert_ffn=expert_ffn,
                    shared_ffn=shared, dense_layers=max(dense, len(only)))
    if kv_lora:
        rope = int(_get(cfg, "qk_rope_head_dim", default=64))
        nope = int(_get(cfg, "qk_nope_head_dim", default=128))
        spec.update(kv_heads=1, head_dim=rope + nope, kv_lora=kv_lora, q_lora=int(_get(cfg, "q_lora_rank", default=0) or 0),
                    rope_dim=rope, nope_dim=nope, v_dim=int(_get(cfg, "v_head_dim", default=nope)))
    return ModelSpec(**spec)


def get_model(model) -> ModelSpec:
    """A ModelSpec from a preset name, a config.json path (or a directory holding one), a dict or a config."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return from_config(model, name=str(model.get("name", "config")))  # helix bench names its configs
    if not isinstance(model, (str, os.PathLike)):
        return from_config(model)
    key = str(model).lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    path = str(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return from_config(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
    raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) "
                     f"or a path to an HF config.json (or its directory)")


def ceil_div(a, b):
    return -(-a // b) if isinstance(a, int) and isinstance(b, int) else math.ceil(a / b)
