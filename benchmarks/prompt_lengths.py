"""One Inductor compile for every prompt length, on one GPU.

    python benchmarks/prompt_lengths.py

Prefills prompts of lengths 7, 5, 9, 300, 3 (a new StaticCache each, then 3 decode steps) through helix on the
default CUDA graphs + Inductor path, checks the logits against transformers (fp32), counts Inductor compiles and
times each generation. After the second length the prefill graph is symbolic: later lengths add no compile.
The model: a random 4-layer Llama (hidden 256, 8 query heads and 4 KV heads of 32, vocabulary 1000). Needs one
CUDA GPU; the CPU tests check the same property (tests/test_exactness.py::test_prompt_lengths_vary).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helix_compile of this checkout

import torch  # noqa: E402

LENGTHS = (7, 5, 9, 300, 3)
VOCAB = 1000


def main():
    argparse.ArgumentParser(description="Prompts of lengths " + ", ".join(map(str, LENGTHS)) + " through one "
                            "compiled helix model on one GPU: Inductor compiles counted, logits against "
                            "transformers, each generation timed.").parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/prompt_lengths.py: needs a CUDA GPU, and torch {torch.__version__} sees none")
    import torch._inductor.compile_fx as inductor
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers import StaticCache as HFStaticCache

    from helix_compile import Layout, StaticCache

    compiles, original = [], inductor.compile_fx
    inductor.compile_fx = lambda *a, **k: compiles.append(1) or original(*a, **k)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512)
    m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().cuda()
    layout = Layout(1, 1, kv_block=16)
    c = torch.compile(m, backend="helix", options={"layout": layout}, fullgraph=True)
    with torch.no_grad():
        for length in LENGTHS:
            cache = StaticCache(m.config, 2, 512, layout, device="cuda")
            ref_cache = HFStaticCache(m.config, max_cache_len=512)
            ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length)).cuda()
            worst, t = 0.0, time.perf_counter()
            for _ in range(4):
                out = c(input_ids=ids, past_key_values=cache).logits[:, -1]
                ref = m(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
                worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
                ids = ref.argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            print(f"length {length}: {time.perf_counter() - t:.2f} s, compile_fx calls so far {len(compiles)}, "
                  f"max rel err {worst:.2e}", flush=True)


if __name__ == "__main__":
    main()
