"""Causal prefill attention on one GPU: helix's partial attention against PyTorch's SDPA backends, in TFLOP/s.

For each KV-head count K and prompt length L (batch 1, 32 query heads of head dim 128, bf16), one run times:
    helix           ``helix::partial_attention`` as a prefill calls it (cuDNN or FlashAttention-2 where it can)
    helix-triton    the Triton kernel the op otherwise runs (``lowering/triton_attention.py``)
    sdpa-flash      ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, flash backend
    sdpa-cudnn      the same, cuDNN backend
and checks that helix's output matches SDPA's (max |difference|) and that cuDNN's private op takes grouped KV
heads itself (``native_gqa``: its output with K heads equals its output with the heads expanded).
Causal FLOPs: 4 * B * Hq * L^2 * D / 2. Writes ``OUT/prefill.json`` and ``OUT/prefill.png``.

    python benchmarks/prefill.py --lengths 32K,64K,128K --kv-heads 1,8 --out prefill-out
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helix_compile of this checkout


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def main(argv=None) -> int:
    from helix_compile.parse import parse_tokens

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32K,64K,128K", help="comma list of prompt lengths (K = 1024)")
    p.add_argument("--kv-heads", default="1,8")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="prefill-out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/prefill.py: needs a CUDA GPU, and torch {torch.__version__} sees none")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import helix_compile  # noqa: F401  (registers the helix ops)
    from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention

    hq, d, dtype, scale = args.heads, args.head_dim, torch.bfloat16, args.head_dim ** -0.5
    rows = []
    for hk in (int(x) for x in args.kv_heads.split(",")):
        for length in (parse_tokens(x) for x in args.lengths.split(",")):
            torch.manual_seed(0)
            q = torch.randn(1, hq, length, d, device="cuda", dtype=dtype)
            k = torch.randn(1, hk, length + 1, d, device="cuda", dtype=dtype)
            v = torch.randn(1, hk, length + 1, d, device="cuda", dtype=dtype)
            pos = torch.arange(length, device="cuda")
            flops = 4 * hq * length * length * d / 2
            row = dict(kv_heads=hk, heads=hq, head_dim=d, length=length)
            kk, vv = k[:, :, :length], v[:, :, :length]
            runs = {
                "helix": lambda: torch.ops.helix.partial_attention(q, k, v, pos, 0, 1, 16, scale),
                "helix-triton": lambda: triton_partial_attention(q, k, v, pos, 0, 1, 16, scale),
            }
            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                def run(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
                runs[name] = run
            outs = {}
            for name, fn in runs.items():
                try:
                    ms = timed(fn, args.reps)
                    row[name + "_ms"], row[name + "_tflops"] = ms, flops / ms / 1e9
                    out = fn()
                    outs[name] = out[..., :d].transpose(0, 1) if name.startswith("helix") else out
                except Exception as e:  # a backend that does not run here is a row entry, not the end of the run
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.empty_cache()
            ref = outs.get("sdpa-flash")
            for name in ("helix", "helix-triton", "sdpa-cudnn"):
                if ref is not None and name in outs:
                    row[name + "_max_diff_vs_flash"] = (outs[name].float() - ref.float()).abs().max().item()
            outs.clear()
            try:  # does cuDNN's op take grouped heads itself?
                small = 4096
                a = torch.ops.aten._scaled_dot_product_cudnn_attention(q[:, :, :small], kk[:, :, :small], vv[:, :, :small],
                                                                       None, True, 0.0, True, False, scale=scale)
                e = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q[:, :, :small], kk[:, :, :small].repeat_interleave(hq // hk, 1),
                    vv[:, :, :small].repeat_interleave(hq // hk, 1), None, True, 0.0, True, False, scale=scale)
                row["native_gqa"] = bool(torch.equal(a[0], e[0]) and torch.equal(a[1].reshape(e[1].shape), e[1]))
                row["lse_shape"] = list(e[1].shape)
            except Exception as exc:
                row["native_gqa"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), host=platform.node(), date=time.strftime("%Y-%m-%d"),
                command="python benchmarks/prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "prefill.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    _plot(rows, meta, out / "prefill.png")
    return 0


def _plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["kv_heads"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, hk in zip(axes[0], sorted({r["kv_heads"] for r in rows})):
        mine = [r for r in rows if r["kv_heads"] == hk]
        for name in ("helix", "helix-triton", "sdpa-flash", "sdpa-cudnn"):
            pts = [(r["length"] // 1024, r[name + "_tflops"]) for r in mine if name + "_tflops" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(title=f"K = {hk}", xlabel="prompt (K tokens)", ylabel="TFLOP/s (causal)")
        ax.legend()
    fig.suptitle(f"causal prefill attention, {meta['card']}, torch {meta['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
