"""A tiny HF checkpoint with a tokenizer, saved locally (no hub access), for the command-line tests."""

from __future__ import annotations

from pathlib import Path

from models import model

WORDS = ["<unk>"] + [f"w{i}" for i in range(95)] + ["<eos>"]  # 97 = the tiny models' vocab
EOS = len(WORDS) - 1


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")


def save(folder: Path, family: str = "llama", dtype=None, **extra) -> Path:
    """config.json + model.safetensors (+ tokenizer files) of ``models.model(family)`` in ``folder``; ``dtype``
    (e.g. torch.bfloat16) saves the weights in that dtype, as released checkpoints ship."""
    m = model(family, eos_token_id=EOS, **extra)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def greedy_text(folder: Path, prompt: str, new_tokens: int) -> str:
    """Single-device greedy continuation with plain transformers: the reference for ``helix generate``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def write_gguf(path: Path, vocab=97, hidden=64, inter=96, layers=2, heads=8, kv=4, seed=0) -> Path:
    """A tiny fp32 llama GGUF with a byte-level BPE tokenizer (one character per token), random weights."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    chars = ["\u0120", "\u0120w"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]  # \u0120: byte-level space
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list((["<unk>", "<s>", "</s>"] + chars)[:vocab])
    w.add_token_merges(["\u0120 w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv * hidden // heads, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv * hidden // heads, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, inter))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", t(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
