"""One Inductor compile for every prompt length, on one GPU.

    python3 tests/gpu/lengths.py

Prefills prompts of lengths 7, 5, 9, 300, 3 (a new StaticCache each, then 3 decode steps) through helix on the
default CUDA graphs + Inductor path, checks the logits against transformers (fp32), counts Inductor compiles and
times each generation. After the second length the prefill graph is symbolic: later lengths add no compile.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._inductor.compile_fx as inductor  # noqa: E402
from transformers import StaticCache as HFStaticCache  # noqa: E402

from helix_compile import Layout, StaticCache  # noqa: E402
from models import model, prompt  # noqa: E402

compiles, original = [], inductor.compile_fx
inductor.compile_fx = lambda *a, **k: compiles.append(1) or original(*a, **k)
m = model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, head_dim=32, vocab_size=1000).cuda()
layout = Layout(1, 1, kv_block=16)
c = torch.compile(m, backend="helix", options={"layout": layout}, fullgraph=True)
with torch.no_grad():
    for length in (7, 5, 9, 300, 3):
        cache, ref_cache = StaticCache(m.config, 2, 512, layout, device="cuda"), HFStaticCache(m.config, max_cache_len=512)
        ids, worst, t = prompt(length=length, seed=length, vocab=1000).cuda(), 0.0, time.perf_counter()
        for _ in range(4):
            out = c(input_ids=ids, past_key_values=cache).logits[:, -1]
            ref = m(input_ids=ids, past_key_values=ref_cache).logits[:, -1]
            worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
            ids = ref.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        print(f"length {length}: {time.perf_counter() - t:.2f} s, compile_fx calls so far {len(compiles)}, "
              f"max rel err {worst:.2e}", flush=True)
