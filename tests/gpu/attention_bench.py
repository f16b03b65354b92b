"""Decode partial attention on one GPU: the Triton kernel vs the reference op vs torch SDPA, checked and timed.

    python3 tests/gpu/attention_bench.py [--out DIR]

For each local shard size it checks the Triton output against the reference (fp32 math) and times both, with
torch's SDPA (flash, GQA) over the same keys as the single-device yardstick. Bandwidth counts the K and V bytes
read once. Writes attention_bench.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from helix_compile.lowering import ops
from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    b, hq, hk, d, dtype = 8, 8, 1, 128, torch.bfloat16  # one TPA slice of a GQA-8 model
    for capacity in (8192, 32768, 131072):
        for kvp in (1, 4):
            g = torch.Generator(device="cuda").manual_seed(capacity)
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(b, hk, capacity + 1, d, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(b, hk, capacity + 1, d, device="cuda", dtype=dtype, generator=g)
            pos = torch.tensor([capacity * kvp - 1], device="cuda")  # every local slot visible
            want = ops.partial_attention_reference(q, k, v, pos, 0, kvp, 16, d ** -0.5)
            got = triton_partial_attention(q, k, v, pos, 0, kvp, 16, d ** -0.5)
            err = (got[..., :d].float() - want[..., :d].float()).abs().max().item()
            lse_err = (got[..., d:].contiguous().view(torch.float32) - want[..., d:].contiguous().view(torch.float32)).abs().max().item()
            t_ref = timed(lambda: ops.partial_attention_reference(q, k, v, pos, 0, kvp, 16, d ** -0.5), reps=5)
            t_tri = timed(lambda: triton_partial_attention(q, k, v, pos, 0, kvp, 16, d ** -0.5))
            ks, vs = k[:, :, :capacity], v[:, :, :capacity]
            q32, k32, v32 = q.float(), k.float(), v.float()  # the fp32 path (tf32x3 products) against fp32 math
            w32 = ops.partial_attention_reference(q32, k32, v32, pos, 0, kvp, 16, d ** -0.5)
            g32 = triton_partial_attention(q32, k32, v32, pos, 0, kvp, 16, d ** -0.5)
            err32 = (g32[..., :d] - w32[..., :d]).abs().max().item()
            t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, ks, vs, enable_gqa=True))
            kv_bytes = 2 * b * hk * capacity * d * dtype.itemsize
            row = dict(capacity=capacity, kvp=kvp, batch=b, q_heads=hq, kv_heads=hk, head_dim=d, dtype="bfloat16",
                       o_err=err, lse_err=lse_err, reference_us=t_ref * 1e6, triton_us=t_tri * 1e6,
                       sdpa_us=t_sdpa * 1e6, fp32_o_err=err32, triton_GBps=kv_bytes / t_tri / 1e9, sdpa_GBps=kv_bytes / t_sdpa / 1e9)
            rows.append(row)
            print(json.dumps(row))
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=__import__("triton").__version__,
                date=time.strftime("%Y-%m-%d"))
    print(json.dumps(info))
    Path(args.out, "attention_bench.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
