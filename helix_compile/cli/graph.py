"""`helix graph`: the FX graph before and after each compiler pass, and their diffs, as text or HTML.

The work is ``helix_compile.graph_view``; this module reads the flags and prints.
"""

from __future__ import annotations

from pathlib import Path

from ..graph_view import PASSES
from . import args as shared

DESCRIPTION = "what the compiler did, pass by pass: the FX graph before and after each pass and their diff"
EPILOG = """examples:
  helix graph llama --kvp 2 --tpa 2                         # a tiny random llama: no weights needed
  helix graph qwen2 --layout kvp=2,tpa=2 --pass partition
  helix graph llama --kvp 2 --tpa 2 --hopb-chunks 2 --pass schedule --html schedule.html
  helix graph ckpt/ --kvp 4 --phase prefill --out graphs/   # a checkpoint's config; the files tests/golden/ holds
"""


def add_parser(subparsers):
    p = shared.subparser(subparsers, "graph", "show the FX graph before/after each compiler pass, and the diffs",
                         DESCRIPTION, EPILOG)
    p.add_argument("model", help="a model_type (llama, qwen2, mistral, ...: a tiny random config) or a checkpoint "
                                 "directory (only its config.json is read)")
    lay = p.add_argument_group("layout")
    shared.add_layout(lay, fields=("kvp", "tpa", "ep", "tpf", "kv_block", "hopb_chunks"),
                      defaults={"tpa": 1, "kv_block": 16, "hopb_chunks": 1})
    p.add_argument("--rank", type=int, default=0, help="whose local graph (default 0)")
    p.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    p.add_argument("--batch", type=shared.positive, default=2)
    shared.add_tokens(p, "--prompt-len", "prompt tokens traced", default=5)
    p.add_argument("--pass", dest="only", choices=PASSES, help="show only this pass")
    p.add_argument("--full", action="store_true", help="print every graph in full, not only the diffs")
    p.add_argument("--html", help="write the report as one self-contained HTML page")
    p.add_argument("--out", help="write the fixture files (capture.txt, detect.txt, plan.json, ...) into this folder")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import warnings

    from ..graph_view import passes_of, report_html, report_text
    from ..layout import Layout

    warnings.filterwarnings("ignore", category=FutureWarning)
    fields = shared.layout_fields(args)
    if "kvp" not in fields:
        raise ValueError("--kvp (or --layout kvp=..) required")
    layout = Layout(**fields)
    title, secs = passes_of(args.model, layout, args.rank, args.phase, args.batch, args.prompt_len, out=args.out)
    secs = [s for s in secs if args.only in (None, s[0])]
    print(f"# {title}\n" + report_text(secs, args.full), end="")
    if args.html:
        Path(args.html).write_text(report_html(secs, title))
        print(f"# wrote {args.html}")
    if args.out:
        print(f"# wrote {args.out}/")
    return 0
