"""GPU smoke run: the exactness check on 1 or 2 GPUs with NCCL, fp32 and bf16, Inductor and the eager executor.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python tests/gpu/smoke.py [--out DIR] [--world N]

With --world 1 the layouts are kvp = tpa = 1 (kernels, Inductor and CUDA graphs without collectives). Every
Inductor configuration runs with CUDA graphs (the default on CUDA) and is also checked bitwise against the same
program without them (``cudagraphs_bitwise``).

The pytest form is ``tests/gpu/test_smoke.py`` (the GPU tier); this script prints one line per configuration and
writes smoke.json, for the full list and the docs (``results/exactness/gpu-smoke-*.json``). It lives with the tests,
not in ``benchmarks/``: it checks rather than times, the GPU tier runs its ``CONFIGS`` and ``body``, and it builds
its models with the tests' tiny configs (``tests/models.py``) and starts its ranks through ``tests/distributed.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import torch  # noqa: E402

from distributed import run_ranks  # noqa: E402
from helix_compile import Layout  # noqa: E402
from helix_compile.testing import compare  # noqa: E402
from models import model, prompt  # noqa: E402

CONFIGS = [  # (family, dtype, executor, layouts, hopb_chunks)
    ("llama", torch.float32, "inductor", [(2, 1), (1, 2)], 1),
    ("llama", torch.bfloat16, "inductor", [(2, 1), (1, 2)], 1),
    ("llama", torch.float32, "eager", [(2, 1)], 1),
    ("llama", torch.float32, "inductor", [(2, 1)], 2),
    ("qwen2", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("mqa", torch.float32, "inductor", [(2, 1)], 1),
    # MoE (TPF x EP), MLA (kvp = N, Dk != Dv), soft-capping, windows, fused and Conv1D projections
    ("mixtral", torch.float32, "inductor", [(2, 1)], 1),
    ("mixtral", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("qwen2_moe", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("deepseek_v3", torch.float32, "inductor", [(2, 1)], 1),
    ("deepseek_v3", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("deepseek_v2", torch.float32, "inductor", [(2, 1)], 1),
    ("gemma2", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("gemma3", torch.float32, "inductor", [(2, 1)], 1),
    ("gpt2", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("bloom", torch.float32, "inductor", [(2, 1)], 1),  # ALiBi inside the kernel
    ("bloom", torch.bfloat16, "inductor", [(2, 1)], 1),
    # chunked attention (the Triton kernel's chunk bound), complex RoPE, dense experts
    ("llama4_text", torch.float32, "inductor", [(2, 1), (1, 2)], 1),
    ("llama4_text", torch.bfloat16, "inductor", [(2, 1)], 1),
    # the KV heads the model caches (Falcon multi-query), values narrower than keys (MiMo), sinks with the row max
    # subtracted and interleaved gate_up experts (gpt-oss)
    ("falcon", torch.float32, "inductor", [(2, 1)], 1),
    ("mimo", torch.float32, "inductor", [(2, 1)], 1),
    ("gpt_oss", torch.float32, "inductor", [(2, 1)], 1),
    ("gpt_oss", torch.bfloat16, "inductor", [(2, 1)], 1),
    # heads in two parts (DiffLLaMA); the host cache length (MPT with ALiBi in eager scores, TrOCR's positions)
    ("diffllama", torch.float32, "inductor", [(2, 1), (1, 2)], 1),
    ("diffllama", torch.bfloat16, "inductor", [(2, 1)], 1),
    ("mpt", torch.float32, "inductor", [(1, 2)], 1),
    ("trocr", torch.bfloat16, "inductor", [(2, 1)], 1),
]
OWN_HEAD_DIMS = {"deepseek_v3", "deepseek_v2", "falcon"}  # MLA's head dims of their own; Falcon's is derived
LAYER_TYPES = {"gpt_oss": ["sliding_attention", "full_attention"] * 2}  # one per layer of the 4


def body(rank, configs, world):
    rows = []
    for family, dtype, executor, layouts, hopb in configs:
        if world == 1:
            layouts, hopb = [(1, 1)], 1
        elif world == 4:  # the 2-rank layouts doubled along the sequence
            layouts = [(2 * kvp, tpa) for kvp, tpa in layouts]
        for kvp, tpa in layouts:
            try:
                torch._dynamo.reset()
                sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=1000)
                if family not in OWN_HEAD_DIMS:
                    sizes["head_dim"] = 32
                if family in LAYER_TYPES:
                    sizes["layer_types"] = LAYER_TYPES[family]
                fp32 = model(family, **sizes).to(device="cuda")
                m = model(family, **sizes).to(device="cuda", dtype=dtype)
                ids = prompt(batch=4, length=9, vocab=1000).cuda()
                t0 = time.perf_counter()
                layout = Layout(kvp, tpa, kv_block=16, hopb_chunks=hopb)
                r = compare(m, layout, ids, 56, 128, executor=executor)
                extra = {}
                if dtype != torch.float32:  # both low-precision runs against the fp32 model, on the fp32 tokens
                    torch._dynamo.reset()
                    helix_vs_fp32 = compare(m, layout, ids, 56, 128, executor=executor, reference=fp32, teacher_forcing=True)
                    torch._dynamo.reset()
                    forced = compare(m, layout, ids, 56, 128, executor=executor, teacher_forcing=True)
                    extra = dict(helix_vs_single_device_forced_rel=forced.max_rel_err,
                                 helix_vs_fp32_rel=helix_vs_fp32.max_rel_err,
                                 single_device_vs_fp32_rel=_single_device_error(m, fp32, ids, 56, 128))
                if executor == "inductor":
                    try:
                        extra["cudagraphs_bitwise"] = _cudagraphs_bitwise(m, layout, ids)
                    except Exception as e:  # a step CUDA graphs cannot capture (fp32 MoE experts): refused by name
                        if "cudagraphs=True" not in str(e):
                            raise
                        extra["cudagraphs_bitwise"] = "refused: " + str(e).split("ValueError: ")[-1][:160]
                rows.append(dict(family=family, dtype=str(dtype).replace("torch.", ""), executor=executor, kvp=kvp, tpa=tpa, hopb=hopb,
                                 max_abs_err=r.max_abs_err, max_rel_err=r.max_rel_err, tokens_equal=r.tokens_equal,
                                 first_divergence=_first_divergence(r), cache_bytes=r.cache_bytes,
                                 reference_cache_bytes=r.reference_cache_bytes, seconds=time.perf_counter() - t0,
                                 logits=r.logits, **extra))
            except Exception as e:  # one configuration's failure is a row, not the end of the run
                import traceback
                traceback.print_exc()
                rows.append(dict(family=family, dtype=str(dtype).replace("torch.", ""), executor=executor, kvp=kvp,
                                 tpa=tpa, hopb=hopb, error=f"{type(e).__name__}: {str(e)[-400:]}", logits=None))
    return rows


@torch.no_grad()
def _cudagraphs_bitwise(m, layout, ids, steps=12):
    """The same program with and without CUDA graphs: logits bitwise equal at every step (pytorch #113895)."""
    from helix_compile import StaticCache

    outs = []
    for graphs in (True, False):
        torch._dynamo.reset()
        cache = StaticCache(m.config, ids.shape[0], 64, layout, dtype=next(m.parameters()).dtype, device=ids.device)
        c = torch.compile(m, backend="helix", options={"layout": layout, "cudagraphs": graphs}, fullgraph=True)
        tok, steps_out = ids, []
        for _ in range(steps):
            logits = c(input_ids=tok, past_key_values=cache).logits[:, -1:]
            steps_out.append(logits)
            tok = logits.argmax(-1)
        outs.append(torch.cat(steps_out, 1))
    return bool(torch.equal(outs[0], outs[1]))


@torch.no_grad()
def _single_device_error(low, fp32, ids, steps, max_len):
    """max |low - fp32| / max |fp32| of the single-device low-precision model, fed the fp32 model's tokens."""
    from transformers import StaticCache as HFStaticCache

    c_low, c_ref = HFStaticCache(low.config, max_cache_len=max_len), HFStaticCache(fp32.config, max_cache_len=max_len)
    err = scale = 0.0
    tok = ids
    for _ in range(steps + 1):
        a = low(input_ids=tok, past_key_values=c_low).logits[:, -1].float()
        b = fp32(input_ids=tok, past_key_values=c_ref).logits[:, -1]
        err, scale = max(err, (a - b).abs().max().item()), max(scale, b.abs().max().item())
        tok = b.argmax(-1, keepdim=True)
    return err / scale


def _first_divergence(r):
    for b, (a, c) in enumerate(zip(r.tokens, r.reference_tokens)):
        for i, (x, y) in enumerate(zip(a, c)):
            if x != y:
                return [b, i]
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--quick", action="store_true", help="the first two configurations only (fp32 and bf16 llama)")
    parser.add_argument("--only", help="comma-separated families (default: all)")
    parser.add_argument("--world", type=int, default=min(2, torch.cuda.device_count()))
    args = parser.parse_args()
    if torch.cuda.device_count() < args.world or args.world not in (1, 2, 4):
        sys.exit(f"--world {args.world}: needs 1, 2 or 4 GPUs, found {torch.cuda.device_count()}")
    configs = CONFIGS[:2] if args.quick else CONFIGS
    if args.only:
        configs = [c for c in configs if c[0] in args.only.split(",")]
    per_rank = run_ranks(args.world, body, configs, args.world, backend="nccl")
    rows = per_rank[0]
    for i, row in enumerate(rows):
        row["ranks_agree"] = all(r[i]["logits"] == row["logits"] for r in per_rank[1:])
        row.pop("logits")
        for r in per_rank[1:]:
            r[i].pop("logits")
        print(json.dumps(row))
    info = dict(device=torch.cuda.get_device_name(0), world=args.world, torch=torch.__version__, cuda=torch.version.cuda,
                transformers=__import__("transformers").__version__, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(info))
    Path(args.out, "smoke.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
