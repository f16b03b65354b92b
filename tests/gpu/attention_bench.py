"""Decode partial attention on one GPU: the Triton kernels vs the reference op vs torch SDPA, checked and timed.

    python3 tests/gpu/attention_bench.py [--out DIR] [--sweep]

For each (batch, KV heads, local slots) it checks the Triton output against the reference (fp32 math, on the
smaller shapes), times the kernel through the op (CUDA-graph captured, so launch overhead is not counted: that is
how the compiled step runs it) and torch's SDPA flash kernel over the same keys (GQA) as the yardstick, and
the HBM read bandwidth of the same card in the same run. Bandwidth counts the K and V bytes read once.
``--sweep`` also times other launch configurations (rows, keys per tile, splits, warps, stages).
Writes attention_bench.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from helix_compile.bench import measure
from helix_compile.lowering import ops
from helix_compile.lowering import triton_attention as ta


def graphed_ms(fn, reps=50):
    """Milliseconds per call of fn replayed from a CUDA graph of ``reps`` calls."""
    return measure.graphed_us(fn, reps) / 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = measure.hbm_read_gbs()
    print(f"{torch.cuda.get_device_name(0)}: HBM read {bw:.0f} GB/s")
    rows = []
    hq, d, kvp, rank, block = 32, 128, 4, 1, 16
    for hk in (1, 8):
        for batch in (1, 8, 64):
            for slots in (16384, 65536, 262144):
                kv_bytes = 2 * batch * hk * slots * d * 2
                if kv_bytes > 40e9:
                    continue
                q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(batch, hk, slots + 1, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                last = (slots // block) * block * kvp + rank * block - 1  # query position: every local slot visible
                pos = torch.tensor([last], device="cuda")
                row = dict(batch=batch, kv_heads=hk, q_heads=hq, head_dim=d, local_slots=slots, dtype="bf16",
                           config=list(ta.launch_config(batch, hk, hq // hk, 1, slots, ta._sm_count(0), q.dtype)))
                call = lambda cfg=None: ta.partial_attention(q, k, v, pos, rank, kvp, block, d ** -0.5, config=cfg)  # noqa: E731
                if batch * hk * slots <= 8 * 65536:
                    want = ops.partial_attention_reference(q, k, v, pos, rank, kvp, block, d ** -0.5)
                    got = call()
                    row["max_abs_err_vs_fp32_reference"] = (got[..., :d].float() - want[..., :d].float()).abs().max().item()
                    lse_g, lse_w = (x[..., d:].contiguous().view(torch.float32) for x in (got, want))
                    row["lse_max_abs_err"] = (lse_g - lse_w).abs().max().item()
                ms = graphed_ms(call)
                row.update(triton_us=ms * 1e3, triton_gbs=kv_bytes / (ms * 1e-3) / 1e9)
                row["triton_pct_hbm"] = 100 * row["triton_gbs"] / bw
                ks, vs = k[:, :, :slots], v[:, :, :slots]
                qs = q
                with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                                                     torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)  # noqa: E731
                    try:
                        ms_s = graphed_ms(sdpa)
                        row.update(sdpa_us=ms_s * 1e3, sdpa_gbs=kv_bytes / (ms_s * 1e-3) / 1e9)
                    except RuntimeError as e:
                        row["sdpa_error"] = str(e)[:200]
                if args.sweep and slots == 65536:
                    best = None
                    for cfg in _candidates(batch, hk, hq // hk, slots):
                        try:
                            t = graphed_ms(lambda: call(cfg), reps=20) * 1e3
                        except Exception as e:  # a configuration the compiler refuses (shared memory, ...)
                            t = float("inf")
                            print("  config", cfg, "failed:", str(e)[:100])
                        if best is None or t < best[1]:
                            best = (cfg, t)
                    row["sweep_best"] = dict(config=list(best[0]), us=best[1], gbs=kv_bytes / (best[1] * 1e-6) / 1e9)
                print(json.dumps(row))
                rows.append(row)
                del q, k, v
                torch.cuda.empty_cache()
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=__import__("triton").__version__,
                hbm_read_gbs=bw, date=time.strftime("%Y-%m-%d"), command="python3 tests/gpu/attention_bench.py"
                + (" --sweep" if args.sweep else ""))
    Path(args.out, "attention_bench.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))


def _candidates(batch, hk, group, slots):
    import triton

    block_r = max(16, min(64, triton.next_power_of_2(group)))
    programs = batch * hk * triton.cdiv(group, block_r)
    for block_n in (64, 128):
        for per_sm in (2, 4):
            for min_split in (512, 2048):
                splits = max(1, min(triton.cdiv(per_sm * 132, programs), triton.cdiv(slots, min_split)))
                for warps, stages in ((4, 3), (8, 3), (4, 4)):
                    yield (block_r, block_n, splits, warps, stages)


if __name__ == "__main__":
    main()
