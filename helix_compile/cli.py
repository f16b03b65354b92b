"""The `helix` command. Each subcommand lives in its own package and registers itself here.

To add one (bench, convert, ...): give its package an `add_parser(subparsers)` that sets `func=run` with
`run(args) -> int`, and append the module to SUBCOMMANDS. User errors are ValueError and print as one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["helix_compile.planner.command", "helix_compile.bench.command"]  # module paths, each with add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helix", description="Helix parallelism for HuggingFace causal LMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"helix {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
