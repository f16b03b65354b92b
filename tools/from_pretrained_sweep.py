"""The front door for every family: each model type exact in the coverage table, saved with transformers'
``save_pretrained`` and read back per rank by ``helix_compile.from_pretrained``.

    python tools/from_pretrained_sweep.py [--only codegen,falcon] [--out FILE.json]

For each model type whose cells in ``docs/coverage.json`` (world 2) are exact: build the model as the coverage
table does (``tools/coverage.py``: tiny, random, fp32), ``save_pretrained`` it into a temporary folder, then on 2
gloo ranks, for every layout the table ran, ``from_pretrained(folder, layout)`` and greedy-decode 4 steps against
the built model (``helix_compile.testing.compare``; with the mask and positions ``generate`` passes where the bare
call cannot be traced, as the table does). A cell is ``exact`` (tokens identical, relative logit error below
1e-5), ``WRONG`` (never acceptable) or the error raised. Families run 8 to a pair of rank processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
STEPS, TOL = 4, 1e-5


def _coverage():
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_tool", ROOT / "tools" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layout(key: str):
    from helix_compile import Layout

    fields = {"kvp": 1, "tpa": 1, "ep": 1}
    for part in key.split("-"):
        name = part.rstrip("0123456789")
        fields[name] = int(part[len(name):])
    return Layout(fields["kvp"], fields["tpa"], ep=fields["ep"], kv_block=_coverage().KV_BLOCK)


def _ranks(rank, jobs):
    import warnings

    import torch

    import helix_compile
    from helix_compile.testing import compare

    warnings.filterwarnings("ignore")
    cov = _coverage()
    out = {}
    for model_type, folder, keys in jobs:
        reference, _ = cov.build(model_type)
        text = reference.config.get_text_config(decoder=True)
        ids = torch.randint(3, text.vocab_size, (cov.BATCH, cov.PROMPT_LEN),
                            generator=torch.Generator().manual_seed(1))
        cells = {}
        for key in keys:
            layout = _layout(key)
            torch._dynamo.reset()
            try:
                sharded = helix_compile.from_pretrained(folder, layout, dtype=torch.float32)
                args = (sharded, layout, ids, STEPS, cov.PROMPT_LEN + STEPS + 2)
                try:
                    r = compare(*args, reference=reference)
                except Exception as e:  # noqa: BLE001
                    if not any(m in str(e) for m in cov.UNTRACEABLE_MARKERS):
                        raise
                    torch._dynamo.reset()
                    r = compare(*args, reference=reference, call="generate")
                exact = r.tokens_equal and r.max_rel_err < TOL
                cells[key] = {"status": "exact" if exact else "WRONG", "err": r.max_rel_err}
            except Exception as e:  # noqa: BLE001  recorded
                cells[key] = {"status": "error", "message": cov.short(e)[:500]}
        out[model_type] = cells
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: every exact one in the table)")
    parser.add_argument("--table", default=str(ROOT / "docs" / "coverage.json"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    from helix_compile.launch import run_ranks

    cov = _coverage()
    table = json.loads(Path(args.table).read_text())
    only = set(args.only.split(",")) if args.only else None
    results, jobs = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, entry in sorted(table.items()):
            if model_type.startswith("_") or not isinstance(entry, dict) or (only and model_type not in only):
                continue
            cells = (entry.get("2") or [{}])[0].get("cells", {})
            keys = [k for k, c in cells.items() if c.get("status") == "ran" and c.get("tokens_equal")]
            if not keys:
                continue
            folder = Path(tmp) / model_type
            try:
                cov.build(model_type)[0].save_pretrained(folder)
            except Exception as e:  # noqa: BLE001
                results[model_type] = {"save": {"status": "error", "message": cov.short(e)[:500]}}
                continue
            jobs.append((model_type, str(folder), keys))
        for i in range(0, len(jobs), 8):
            chunk = jobs[i:i + 8]
            try:
                results.update(run_ranks(2, _ranks, chunk, timeout=900)[0])
            except RuntimeError as e:
                for model_type, _, _ in chunk:
                    results[model_type] = {"ranks": {"status": "error", "message": str(e)[-500:]}}
            for model_type, _, _ in chunk:
                print(model_type, {k: c["status"] for k, c in results[model_type].items()}, flush=True)
    exact = sorted(t for t, cells in results.items() if all(c["status"] == "exact" for c in cells.values()))
    wrong = sorted(t for t, cells in results.items() if any(c["status"] == "WRONG" for c in cells.values()))
    print(f"{len(exact)} of {len(results)} families exact through from_pretrained; WRONG: {wrong or 'none'}")
    if args.out:
        import torch
        import transformers

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        record = {"date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
                  "transformers": transformers.__version__, "command": " ".join(["python"] + sys.argv),
                  "exact": len(exact), "families": len(results)}
        Path(args.out).write_text(json.dumps({"_run": record, **results}, indent=1, sort_keys=True) + "\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
