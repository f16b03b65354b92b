"""The planner's predictions for `helix bench --gpus 8`: what the cost model expects on 8 GPUs.

    python tools/predict_8gpu.py [--hw h200 docs/perf/h200-calibrated-2026-11-29.json] > docs/perf/predictions-8gpu-h200.json

For the bench models (helix_compile.bench.measure: 8 layers, 8B widths, K = 1, 2, 8), 8 GPUs, 256Ki and 1Mi
tokens, batch 1, 8 and 32: TP = 8 and every Helix kvp x tpa, HOP-B on and off, with the preset and with the
hardware calibrated on a one-H200 bench (`helix plan --calibrate`), for comparison with an 8-GPU `helix bench` run.
"""

import argparse
import json
import time

from helix_compile.bench.measure import MODELS, model_config
from helix_compile.planner import plan


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hw", nargs="+", default=["h200", "docs/perf/h200-calibrated-2026-11-29.json"])
    args = p.parse_args()
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
    print(json.dumps(dict(date=time.strftime("%Y-%m-%d"), command="python tools/predict_8gpu.py", rows=rows), indent=1))


if __name__ == "__main__":
    main()
