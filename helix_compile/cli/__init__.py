"""The `helix` command: one thin module per subcommand, on the argument groups of ``cli/args.py``.

Each module has ``add_parser(subparsers)``, which sets ``func=run`` with ``run(args) -> int``; the work is done by
library modules the Python API uses too (``planner``, ``convert``, ``generation``, ``graph_view``, ``bench``).
User errors are ValueError and print as one line with exit code 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

# module paths, each with add_parser(subparsers); listed in `helix --help` in this order
SUBCOMMANDS = [
    "helix_compile.cli.plan",
    "helix_compile.cli.convert",
    "helix_compile.cli.generate",
    "helix_compile.cli.graph",
    "helix_compile.cli.bench",
]

EPILOG = """examples:
  helix plan --model llama-3.1-405b --nproc-per-node 64 --context 1M --dtype fp4 --hw gb200
  helix convert ckpt/ --kvp 2 --tpa 2 -o ckpt-helix/          # one safetensors file per rank + the manifest
  helix convert --verify ckpt-helix/
  helix generate ckpt-helix/ --prompt "Hello" --max-new-tokens 32   # launches the manifest's 4 ranks itself
  torchrun --nproc-per-node 4 -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
  helix graph llama --kvp 2 --tpa 2 --html graph.html        # tiny random llama: the graph after each pass
  helix bench --nproc-per-node 4 --models mqa,gqa8 --contexts 32K,256K --batches 1,8,32 --out bench-out

Token counts are in K = 1024 tokens (128K = 131072, 1M = 1048576). `helix COMMAND --help` shows each command's
options and more examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helix", description="Helix parallelism for HuggingFace causal LMs",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C does: `finally` blocks remove temporary files


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's one-line error (2)
        return e.code if isinstance(e.code, int) else 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"helix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"helix {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
