"""The planner's predictions for `helix bench --gpus 8`: what the cost model expects on 8 GPUs.

    python benchmarks/predict_8gpu.py [--hw h200 results/perf/h200-calibrated-2026-11-29.json] > predictions.json

For the bench models (helix_compile.bench.measure: 8 layers, 8B widths, K = 1, 2, 8), 8 GPUs, 256Ki and 1Mi
tokens, batch 1, 8 and 32: TP = 8 and every Helix kvp x tpa, HOP-B on and off, with the preset and with the
hardware calibrated on a one-H200 bench (`helix plan --calibrate`), for comparison with an 8-GPU `helix bench` run.
The cost model runs on the CPU: no GPU is needed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helix_compile of this checkout

from helix_compile.bench.measure import MODELS, model_config  # noqa: E402
from helix_compile.planner import plan  # noqa: E402

CALIBRATED = "results/perf/h200-calibrated-2026-11-29.json"  # helix plan --calibrate on one H200's bench


def main():
    p = argparse.ArgumentParser(description="The planner's predicted time per token of the bench models on 8 GPUs "
                                "(TP=8 and every Helix layout, HOP-B on and off), as JSON on stdout.")
    p.add_argument("--hw", nargs="+", default=["h200", CALIBRATED],
                   help="hardware presets or `helix plan --save-hw` files (default: %(default)s, from the repository "
                        "root)")
    args = p.parse_args()
    for hw in args.hw:
        if hw.endswith(".json") and not Path(hw).is_file():
            p.error(f"--hw {hw}: no such file in {Path.cwd()} (the default is a path from the repository root)")
    rows = []
    for name, kv in MODELS.items():
        cfg = model_config(name, 8).to_dict()
        cfg["_name_or_path"] = name
        layouts = [("tp", None, False)] + [(f"kvp={8 // t},tpa={t}", t, h) for t in (1, 2, 4) if t <= kv for h in (True, False)]
        for ctx in ("256Ki", "1Mi"):
            for batch in (1, 8, 32):
                for hw in args.hw:
                    for label, tpa, hopb in layouts:
                        kw = dict(strategies=("tp",)) if tpa is None else dict(layout=label)
                        try:
                            best = plan(cfg, 8, ctx, batch=batch, hw=hw, replicas=False, hopb=hopb, **kw).best
                            err = None if best else "does not fit"
                        except ValueError as e:
                            best, err = None, str(e)
                        rows.append(dict(model=name, kv_heads=kv, context=ctx, batch=batch, hw=hw, layout=label,
                                         hopb=hopb, ttl_ms=best and round(best.ttl_s * 1e3, 3),
                                         tokens_per_s_per_gpu=best and round(best.tokens_per_s_per_gpu, 1), error=err))
    print(json.dumps(dict(date=time.strftime("%Y-%m-%d"), command="python benchmarks/predict_8gpu.py", rows=rows), indent=1))


if __name__ == "__main__":
    main()
