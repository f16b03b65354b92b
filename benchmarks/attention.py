"""Decode partial attention on one GPU: the Triton kernels vs the reference op vs torch SDPA, checked and timed.

    python benchmarks/attention.py [--out DIR] [--sweep] [--extra-only]

For each (batch, KV heads, local slots) it checks the Triton output against the reference (fp32 math, on the
smaller shapes), times the kernel through the op (CUDA-graph captured, so launch overhead is not counted: that is
how the compiled step runs it) and torch's SDPA flash kernel over the same keys (GQA) as the yardstick, and
the HBM read bandwidth of the same card in the same run. Bandwidth counts the K and V bytes read once.
``--sweep`` also times other launch configurations (rows, keys per tile, splits, warps, stages).
Writes attention_bench.json into --out. Needs one CUDA GPU (Triton).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helix_compile of this checkout

import torch  # noqa: E402

# helix_compile's kernel modules are imported where they are used, after the GPU check: Triton may be missing on a
# machine without CUDA, and --help works there.


def graphed_ms(fn, reps=50):
    """Milliseconds per call of fn replayed from a CUDA graph of ``reps`` calls."""
    from helix_compile.bench import measure

    return measure.graphed_us(fn, reps) / 1e3


def errors(got, want, dv):
    """Max abs errors of a packed kernel output against the fp32 reference's: the values and the LSE."""
    lse_g, lse_w = (x[..., dv:].contiguous().view(torch.float32) for x in (got, want))
    return dict(max_abs_err_vs_fp32_reference=(got[..., :dv].float() - want[..., :dv].float()).abs().max().item(),
                lse_max_abs_err=(lse_g - lse_w).abs().max().item())


def main():
    parser = argparse.ArgumentParser(description="The Triton partial-attention kernels on one GPU: checked against "
                                     "the reference op, timed against torch SDPA and the measured HBM read bandwidth.")
    parser.add_argument("--out", default=".", help="folder for attention_bench.json (default: the current one)")
    parser.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    parser.add_argument("--extra-only", action="store_true", help="only the ALiBi / absorbed-MLA cases (and with "
                        "--sweep the K=1, batch-1 sweep), not the main grid")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/attention.py: needs a CUDA GPU, and torch {torch.__version__} sees none")
    from helix_compile.bench import measure
    from helix_compile.lowering import ops
    from helix_compile.lowering import triton_attention as ta

    torch.manual_seed(0)
    bw = measure.hbm_read_gbs()
    print(f"{torch.cuda.get_device_name(0)}: HBM read {bw:.0f} GB/s")
    rows = []
    hq, d, kvp, rank, block = 32, 128, 4, 1, 16
    for hk in () if args.extra_only else (1, 8):
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
                    row.update(errors(call(), want, d))
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
    rows += _extra_cases(bw, args.sweep)
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=__import__("triton").__version__,
                hbm_read_gbs=bw, date=time.strftime("%Y-%m-%d"), command="python benchmarks/attention.py"
                + (" --sweep" if args.sweep else "") + (" --extra-only" if args.extra_only else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "attention_bench.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))


def _extra_cases(bw, sweep):
    """The kernel paths the main grid does not take, each checked against the fp32 reference and timed:
    ALiBi (BLOOM: 8 local heads of their own, decode and prefill) and absorbed MLA at DeepSeek-V3's widths (16
    local query heads, one KV head: latent 512 + rotary key 64, the values the latent), as the MLA pass calls it
    ("mla-absorbed": the latent and the rotary key in two tensors, ``k_rope``) and, for comparison, as one
    concatenated key ("mla-concat": one tensor, the values a view of it; the concatenation itself not timed).
    With ``sweep``, the MLA cases also time other launch configurations."""
    from helix_compile.lowering import ops
    from helix_compile.lowering import triton_attention as ta

    rows, kvp, rank, block = [], 4, 1, 16
    cases = [("alibi", 8, 8, 128, 128, 8, 65536, 1), ("alibi", 8, 8, 128, 128, 1, 8192, 512),
             ("mla-absorbed", 16, 1, 576, 512, 1, 65536, 1), ("mla-absorbed", 16, 1, 576, 512, 8, 65536, 1),
             ("mla-absorbed", 16, 1, 576, 512, 32, 32768, 1), ("mla-concat", 16, 1, 576, 512, 8, 65536, 1)]
    for kind, hq, hk, d, dv, batch, slots, length in cases:
        extra = {}
        q = torch.randn(batch, hq, length, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, hk, slots + 1, d, device="cuda", dtype=torch.bfloat16)
        v = k[..., :dv] if kind.startswith("mla") else torch.randn_like(k)
        k_ref = k
        if kind == "mla-absorbed":
            k, extra["k_rope"] = k[..., :dv].contiguous(), k[..., dv:].contiguous()
            v = k
        last = (slots // block) * block * kvp + rank * block - 1
        pos = torch.arange(last - length + 1, last + 1, device="cuda")
        if kind == "alibi":
            extra["alibi_slopes"] = 2.0 ** -torch.arange(1, hq + 1, device="cuda", dtype=torch.float32)
        scale = d ** -0.5
        kv_bytes = batch * hk * slots * (d + (0 if kind.startswith("mla") else dv)) * 2
        row = dict(kind=kind, batch=batch, kv_heads=hk, q_heads=hq, head_dim=d, v_head_dim=dv, local_slots=slots,
                   query_len=length, dtype="bf16")
        call = lambda cfg=None: ta.partial_attention(q, k, v, pos, rank, kvp, block, scale, config=cfg, **extra)  # noqa: E731
        try:
            got = call()
            if batch * hk * slots * length <= 1 << 26:
                want = ops.partial_attention_reference(q, k_ref, k_ref[..., :dv] if kind.startswith("mla") else v, pos,
                                                       rank, kvp, block, scale,
                                                       **{n: x for n, x in extra.items() if n != "k_rope"})
                row.update(errors(got, want, dv))
            ms = graphed_ms(call)
            row.update(triton_us=ms * 1e3, triton_gbs=kv_bytes / (ms * 1e-3) / 1e9)
            row["triton_pct_hbm"] = 100 * row["triton_gbs"] / bw
            if sweep and kind == "mla-absorbed" and batch == 8:
                best = None
                for cfg in [(16, n, sp, w, st) for n in (16, 32, 64) for w in (4, 8) for st in (1, 2, 3)
                            for sp in sorted({row_splits(batch, slots), 2 * row_splits(batch, slots)})]:
                    try:
                        t = graphed_ms(lambda: call(cfg), reps=20) * 1e3
                    except Exception as e:
                        print("  config", cfg, "failed:", str(e)[:100])
                        continue
                    print(json.dumps(dict(kind=kind + "-sweep", batch=batch, config=list(cfg), us=t,
                                          pct_hbm=100 * kv_bytes / (t * 1e-6) / 1e9 / bw)))
                    if best is None or t < best[1]:
                        best = (cfg, t)
                row["sweep_best"] = dict(config=list(best[0]), us=best[1],
                                         pct_hbm=100 * kv_bytes / (best[1] * 1e-6) / 1e9 / bw) if best else None
        except Exception as e:  # a configuration the compiler refuses: recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row))
        rows.append(row)
        del q, k, v, k_ref
        torch.cuda.empty_cache()
    if sweep:  # K = 1 at batch 1, the case below the target: more, shorter splits and 128-key tiles
        for slots in (65536, 262144):
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 1, slots + 1, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            pos = torch.tensor([(slots // block) * block * kvp + rank * block - 1], device="cuda")
            kv_bytes = 2 * slots * 128 * 2
            for splits in (64, 128, 264, 528):
                for block_n in (64, 128):
                    for warps, stages in ((4, 3),):
                        cfg = (32, block_n, splits, warps, stages)
                        if slots // splits < block_n:
                            continue
                        try:
                            us = graphed_ms(lambda: ta.partial_attention(q, k, v, pos, rank, kvp, block, 128 ** -0.5,
                                                                         config=cfg), reps=20) * 1e3
                        except Exception as e:
                            print("  config", cfg, "failed:", str(e)[:100])
                            continue
                        row = dict(kind="k1-b1-sweep", batch=1, kv_heads=1, q_heads=32, local_slots=slots,
                                   config=list(cfg), triton_us=us, triton_pct_hbm=100 * kv_bytes / (us * 1e-6) / 1e9 / bw)
                        print(json.dumps(row))
                        rows.append(row)
    return rows


def row_splits(batch, slots):
    """The default launch's splits for one KV head and 16 rows (``launch_config``'s rule)."""
    import triton

    return max(1, min(triton.cdiv(2 * 132, batch), triton.cdiv(slots, 512)))


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
