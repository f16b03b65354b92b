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
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save(folder: Path, family: str = "llama", **extra) -> Path:
    """config.json + model.safetensors (+ tokenizer files) of ``models.model(family)`` in ``folder``."""
    m = model(family, eos_token_id=EOS, **extra)
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
