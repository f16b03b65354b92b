"""`helix convert`: split a checkpoint into one safetensors file per rank, plus a manifest (``manifest.json``).

The work is ``helix_compile.convert`` (its docstring is the contract); this module reads the flags.
"""

from __future__ import annotations

from . import args as shared

DESCRIPTION = ("split a checkpoint into one safetensors file per rank plus a manifest, manifest.json (the whole "
               "layout, the sha256 of every file)")
EPILOG = """examples:
  helix convert ckpt/ --kvp 2 --tpa 2 -o ckpt-helix/                # HF safetensors directory (sharded or not)
  helix convert ckpt/ --layout kvp=2,tpa=2 -o ckpt-helix/           # the same layout as one string
  helix convert mixtral/ --kvp 4 --ep 2 -o mixtral-helix/           # MoE: 2 expert groups, each TP-split over tpf=2
  helix convert SmolLM2-135M-Instruct.Q4_1.gguf --kvp 2 -o smollm2-helix/   # GGUF: transformers de-quantises it
  helix convert --verify ckpt-helix/                                # re-check every sha256 against the manifest
"""


def add_parser(subparsers):
    p = shared.subparser(subparsers, "convert", "write one safetensors file per rank plus a manifest (manifest.json)",
                         DESCRIPTION, EPILOG)
    p.add_argument("model", nargs="?", help="HF checkpoint directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument("-o", "--out", help="output directory (must not exist)")
    lay = p.add_argument_group("layout (N = kvp * tpa = tpf * ep ranks)")
    shared.add_layout(lay, defaults={"tpa": 1, "ep": 1, "kv_block": 16})
    shared.add_dtype(p, default="auto", help_text="cast floating tensors (auto: keep the checkpoint's)")
    p.add_argument("--verify", metavar="OUT", help="re-check every file of a conversion against its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..convert import convert, verify

    if args.verify:
        bad = verify(args.verify)
        for line in bad:
            print(f"helix convert --verify: {line}")
        if bad:
            print(f"{len(bad)} bad file(s) in {args.verify}: convert the original checkpoint again (or copy the "
                  f"named files again)")
            return 1
        print(f"{args.verify}: every file matches the manifest")
        return 0
    fields = shared.layout_fields(args)
    missing = [n for n, v in (("MODEL", args.model), ("-o/--out", args.out), ("--kvp", fields.get("kvp"))) if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --verify OUT)")
    import torch

    from ..layout import Layout

    layout = Layout(**fields)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    out = convert(args.model, layout, args.out, dtype=dtype, progress=not args.quiet)
    print(f"wrote {out}: {layout.world_size} rank files + manifest.json (kvp={layout.kvp} tpa={layout.tpa} "
          f"tpf={layout.tpf} ep={layout.ep} kv_block={layout.kv_block})")
    return 0
