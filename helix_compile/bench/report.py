"""`helix bench` output: bench.json (schema "helix-bench/1", read by ``helix plan --calibrate``), a table, plots.

Per decode row: ttl_ms (time per output token, steps back to back), host_ms (host time per call), floor_ms and
pct_floor = 100 * floor / ttl, tokens/s per GPU (batch / ttl / gpus) and per user (1 / ttl), memory per GPU.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def write(out: Path, result: dict, n: int, spec: dict, command: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    decode = []
    for r in result["rows"]:
        row = dict(r)
        if r["error"] is None and r["ttl_ms"] == r["ttl_ms"]:
            row.update(tokens_per_s_gpu=r["batch"] / r["ttl_ms"] * 1e3 / r["gpus"],
                       tokens_per_s_user=1e3 / r["ttl_ms"], pct_floor=100 * r["floor_ms"] / r["ttl_ms"],
                       host_pct=100 * r["host_ms"] / r["ttl_ms"])
        row["model"] = dict(name=r["model"], hidden_size=4096, num_attention_heads=32, num_key_value_heads=r["kv_heads"],
                            head_dim=128, intermediate_size=14336, num_hidden_layers=r["layers"], vocab_size=128256)
        row["layout"] = dict(strategy=r["strategy"], kvp=r["kvp"], tpa=r["tpa"], tpf=r["kvp"] * r["tpa"], ep=1,
                             hopb_chunks=r["hopb_chunks"])
        row["dtype"] = "bf16"
        if r.get("kv_dtype", "bf16") != "bf16":  # the helix cache's elements (helix bench --kv-dtype fp8)
            row["kv_dtype"] = r["kv_dtype"]
        else:
            row.pop("kv_dtype", None)
        decode.append(row)
    data = {
        "schema": "helix-bench/1",
        "hardware": dict(preset="h200" if "H200" in result["device"] else "h100", card=result["device"], gpus=n,
                         torch=result["torch"], nccl=result["nccl"], triton=result["triton"],
                         transformers=result["transformers"], date=time.strftime("%Y-%m-%d"), command=command,
                         seconds=round(seconds)),
        "memory": {"hbm_read_gbs": result["hbm_read_gbs"]},
        "collectives": result["collectives"],
        "decode": [d for d in decode if d.get("error") is None],
        "failed": [d for d in decode if d.get("error") is not None],
        "prefill": result["prefill"],
        "spec": spec,
    }
    (out / "bench.json").write_text(json.dumps(data, indent=1))
    print(table(decode))
    for r in decode:
        if r.get("profile"):
            p = r["profile"]
            top = "; ".join(f"{k['kernel'][:40]} {k['ms_per_step']:.3f}" for k in p["top"][:4])
            print(f"profile {r['model']['name']} {r['strategy']} kvp={r['kvp']} tpa={r['tpa']} B={r['batch']} "
                  f"ctx={r['context']}: {p['wall_ms']:.2f} ms/step, GPU busy {p['gpu_busy_ms']:.2f}, exposed "
                  f"{p['exposed_ms']:.2f}, {p['kernels_per_step']:.0f} kernels; top: {top}")
    _plots(out, decode)


def table(rows) -> str:
    head = f"{'model':6} {'strategy':20} {'kvp':>3} {'tpa':>3} {'hopb':>4} {'B':>3} {'ctx':>8} {'ttl ms':>8} " \
           f"{'floor':>7} {'%floor':>6} {'host ms':>7} {'tok/s/gpu':>9} {'mem GB':>6}"
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']['name']:6} {r['strategy']:20} {r['kvp']:>3} {r['tpa']:>3} {r['hopb_chunks']:>4} "
                         f"{r['batch']:>3} {r['context']:>8}  error: {r['error'][:80]}")
            continue
        lines.append(f"{r['model']['name']:6} {r['strategy']:20} {r['kvp']:>3} {r['tpa']:>3} {r['hopb_chunks']:>4} "
                     f"{r['batch']:>3} {r['context']:>8} {r['ttl_ms']:8.3f} {r['floor_ms']:7.3f} "
                     f"{r['pct_floor']:6.1f} {r['host_ms']:7.3f} {r['tokens_per_s_gpu']:9.1f} {r['mem_gb']:6.1f}")
    return "\n".join(lines)


def _plots(out: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error") and not math.isnan(r["ttl_ms"])]
    for name in sorted({r["model"]["name"] for r in ok}):
        mine = [r for r in ok if r["model"]["name"] == name]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for key in sorted({(r["strategy"], r["kvp"], r["tpa"], r["hopb_chunks"], r["context"]) for r in mine}):
            pts = sorted((r for r in mine if (r["strategy"], r["kvp"], r["tpa"], r["hopb_chunks"], r["context"]) == key),
                         key=lambda r: r["batch"])
            label = f"{key[0]} kvp={key[1]} tpa={key[2]}" + (f" hopb={key[3]}" if key[3] > 1 else "") + f" S={key[4] // 1024}K"
            a.plot([r["batch"] for r in pts], [r["ttl_ms"] for r in pts], marker="o", label=label)
            b.plot([r["tokens_per_s_user"] for r in pts], [r["tokens_per_s_gpu"] for r in pts], marker="o", label=label)
        a.set(xlabel="batch", ylabel="TTL (ms per token)", xscale="log", yscale="log", title=f"{name}: TTL vs batch")
        b.set(xlabel="tokens/s/user", ylabel="tokens/s/GPU", xscale="log", yscale="log", title=f"{name}: throughput")
        a.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
