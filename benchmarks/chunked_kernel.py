"""GPU check of the Triton kernel's chunk bound (Llama 4's chunked attention) against the reference op, compiled on
CUDA with the default launch configuration (decode with splits and prefill row blocks, long shards so the chunk's
lower bound ``lo`` skips most of them), fp32 and bf16, with and without a left-padded key mask.

    python benchmarks/chunked_kernel.py [--out DIR]     (writes DIR/kernel.json; prints the cases over tolerance)

Needs one CUDA GPU. The CPU tests run the same kernel in Triton's interpreter
(tests/lowering/test_triton_attention.py).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helix_compile of this checkout

import torch  # noqa: E402

CASES = [  # b, hq, hk, L, d, capacity, kvp, rank, block
    (2, 8, 2, 1, 64, 4096, 2, 1, 16), (1, 32, 8, 1, 128, 8192, 4, 3, 32), (3, 4, 1, 1, 32, 600, 1, 0, 16),
    (2, 8, 2, 37, 64, 512, 2, 0, 16), (1, 4, 4, 130, 32, 300, 1, 0, 16)]


def main():
    parser = argparse.ArgumentParser(description="The Triton kernel's chunk bound (chunked attention) on one GPU, "
                                     "against the reference op: fp32 and bf16, decode and prefill, with and without "
                                     "a key mask.")
    parser.add_argument("--out", default=".", help="folder for kernel.json (default: the current one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/chunked_kernel.py: needs a CUDA GPU, and torch {torch.__version__} sees none")
    from helix_compile.lowering import ops
    from helix_compile.lowering.triton_attention import partial_attention as tpa

    rows = []
    torch.manual_seed(0)
    for (b, hq, hk, L, d, cap, kvp, rank, block), dtype, chunk, masked in itertools.product(
            CASES, (torch.float32, torch.bfloat16), (8, 100, 1024), (False, True)):
        q = torch.randn(b, hq, L, d, device="cuda").to(dtype)
        k = torch.randn(b, hk, cap + 1, d, device="cuda").to(dtype)
        v = torch.randn(b, hk, cap + 1, d, device="cuda").to(dtype)
        total = cap * kvp
        first = total - L - 3
        pos = torch.arange(L, device="cuda") + first
        mask = None
        if masked:
            mask = torch.ones(b, total, dtype=torch.long, device="cuda")
            mask[0, :37] = 0
        want = ops.partial_attention_reference(q, k, v, pos, rank, kvp, block, d ** -0.5, 0.0, 0, mask, None, None,
                                               chunk=chunk)
        got = tpa(q, k, v, pos, rank, kvp, block, d ** -0.5, 0.0, 0, mask, chunk=chunk)
        lw = want[..., d:].contiguous().view(torch.float32)
        lg = got[..., d:].contiguous().view(torch.float32)
        fin = torch.isfinite(lw)
        err = (got[..., :d].float() - want[..., :d].float()).abs().max().item()
        lerr = (lg[fin] - lw[fin]).abs().max().item() if fin.any() else 0.0
        rows.append(dict(case=(b, hq, hk, L, d, cap, kvp, rank, block), dtype=str(dtype), chunk=chunk, masked=masked,
                         o_err=err, lse_err=lerr, inf_same=bool(torch.equal(torch.isinf(lg), torch.isinf(lw)))))
    bad = [r for r in rows if not r["inf_same"] or r["o_err"] > (1e-4 if "float32" in r["dtype"] else 2e-2)
           or r["lse_err"] > 1e-3]
    print("kernel cases", len(rows), "bad", len(bad))
    for r in bad[:10]:
        print(r)
    print("max fp32 o_err", max(r["o_err"] for r in rows if "float32" in r["dtype"]),
          "max bf16 o_err", max(r["o_err"] for r in rows if "bfloat16" in r["dtype"]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "kernel.json").write_text(json.dumps(rows, indent=0))


if __name__ == "__main__":
    main()
