"""The argument groups every `helix` command shares, so that a flag means one thing with one parser everywhere:

- layout: ``--layout kvp=..,tpa=..[,tpf=..,ep=..,kv_block=..,hopb_chunks=..]`` or ``--kvp/--tpa/--ep/--tpf/
  --kv-block`` (``parse.parse_layout``; ``layout_fields`` merges and checks the two forms);
- ranks: ``--nproc-per-node N`` as torchrun names it (``--nproc`` and ``--gpus`` are accepted too);
- dtype: ``--dtype`` auto|bfloat16|float16|float32 (bf16, fp16, fp32 accepted; fp8 and fp4 where the cost model
  takes them) through ``parse.parse_dtype``;
- KV dtype: ``--kv-dtype auto|fp8`` (auto: the model's dtype; fp8: ``StaticCache(kv_dtype=torch.float8_e4m3fn)``);
- device: ``--device auto|cuda|cpu``;
- token counts: ``parse.parse_tokens``, K = 1024 (``token_count``, stated in every such flag's help).

Each ``add_*`` adds its flags to a parser (or group) and returns it; the parse functions are the ``type=`` of the
flags, so a bad value is argparse's one-line error with exit code 2.
"""

from __future__ import annotations

import argparse

from ..parse import DTYPE_ALIASES, LAYOUT_FIELDS, TOKEN_UNITS, TORCH_DTYPES, parse_dtype, parse_layout, parse_tokens

def _typed(parse, name: str):
    """An argparse ``type=`` from a parse function: its ValueError becomes argparse's error for the flag."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in some messages
    convert.parse = parse  # the shared parser behind this flag (tests check every command uses the same one)
    return convert


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


layout_text = _typed(parse_layout, "layout")
token_count = _typed(parse_tokens, "token count")


def dtype_type(allowed):
    kind = _typed(lambda text: parse_dtype(text, allowed), "dtype")
    kind.parse = parse_dtype
    return kind


def layout_or_auto(text: str):
    return "auto" if text.strip() == "auto" else layout_text(text)


layout_or_auto.parse = parse_layout


def add_layout(p, *, auto: bool = False, fields=("kvp", "tpa", "ep", "tpf", "kv_block"), defaults=None,
               shown=None):
    """--layout and one flag per field. ``auto``: --layout also takes 'auto' (the planner picks). ``defaults``:
    {field: value} shown in the help and used when the field is given neither way; ``shown``: {field: text} of
    defaults the command decides later (only shown)."""
    defaults = defaults or {}
    shown = {**{k: str(v) for k, v in defaults.items()}, **(shown or {})}
    helps = {"kvp": "KV-parallel width: ranks that split the KV cache along the sequence",
             "tpa": "tensor-parallel width of attention: ranks that split the KV heads",
             "ep": "expert-parallel width of an MoE FFN: groups holding 1/ep of the routed experts each",
             "tpf": "tensor-parallel width of the FFN (default: ranks / ep)",
             "kv_block": "tokens per round-robin KV block",
             "hopb_chunks": "batch chunks of HOP-B (1: off)"}
    p.add_argument("--layout", type=layout_or_auto if auto else layout_text,
                   help=("'auto' (the planner picks) or " if auto else "")
                   + f"a comma list of {', '.join(LAYOUT_FIELDS)} such as kvp=2,tpa=2 (or give --kvp/--tpa/...)")
    for f in fields:
        p.add_argument(f"--{f.replace('_', '-')}", dest=f, type=positive, default=None,
                       help=helps[f] + (f" (default: {shown[f]})" if f in shown else ""))
    p.set_defaults(layout_defaults=defaults)
    return p


def layout_fields(args, flag: str = "--layout") -> dict | str:
    """The layout the user gave: 'auto', or {field: int} from --layout and the per-field flags (never both for the
    same layout), with the command's defaults for the fields given neither way."""
    flags = {k: getattr(args, k) for k in LAYOUT_FIELDS if getattr(args, k, None) is not None}
    given = getattr(args, "layout", None)
    if given == "auto":
        if set(flags) - {"kv_block"}:
            raise ValueError(f"{flag} auto and --kvp/--tpa/--ep/--tpf both set the layout: give it one way")
        return "auto"
    if given:
        clash = sorted(set(flags) & set(given) | (set(flags) - {"kv_block"}))
        if clash:
            text = ",".join(f"{k}={v}" for k, v in given.items())
            named = " ".join(f"--{k.replace('_', '-')} {flags[k]}" for k in clash if k in flags)
            raise ValueError(f"{flag} {text} and {named} both set the layout: give it one way")
        flags = {**given, **flags}
    return {**{k: v for k, v in getattr(args, "layout_defaults", {}).items() if k not in flags}, **flags}


def add_ranks(p, help_text: str):
    """--nproc-per-node N (torchrun's name); --nproc and --gpus are the same flag."""
    p.add_argument("--nproc-per-node", "--nproc", "--gpus", dest="nproc", type=positive, metavar="N", help=help_text)
    return p


def add_dtype(p, allowed=("auto",) + TORCH_DTYPES, default="auto", help_text="weights and KV cache"):
    aliases = [k for k, v in DTYPE_ALIASES.items() if k != v and v in allowed]
    p.add_argument("--dtype", type=dtype_type(allowed), default=default, metavar="DTYPE",
                   help=f"{help_text}: {'|'.join(allowed)}" + (f" ({', '.join(aliases)} accepted)" if aliases else "")
                   + (f"; default {default}" if default is not None else ""))
    return p


KV_DTYPES = ("auto", "fp8")


def add_kv_dtype(p):
    """--kv-dtype auto|fp8: what the KV cache holds (``StaticCache(kv_dtype=...)``)."""
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV cache elements: auto (the model's dtype, exact) or fp8 (float8_e4m3fn with one fp32 scale "
                        "per KV head, half a bf16 cache's bytes; an approximation: docs/perf.md); default auto")
    return p


def add_device(p):
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cuda: rank r on cuda:LOCAL_RANK with NCCL; cpu: gloo ranks (default auto: cuda when present)")
    return p


def add_tokens(p, flag: str, help_text: str, default=None, many: bool = False):
    """A token-count flag (``many``: a comma list of them), K = 1024."""
    kind = token_count
    if many:
        kind = _typed(lambda text: [parse_tokens(t) for t in text.split(",")], "token counts")
        kind.parse = parse_tokens
    p.add_argument(flag, type=kind, default=default,
                   help=f"{help_text}; {TOKEN_UNITS}" + (f" (default {default})" if default is not None else ""))
    return p


def subparser(subparsers, name: str, help_text: str, description: str, epilog: str):
    return subparsers.add_parser(name, help=help_text, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
