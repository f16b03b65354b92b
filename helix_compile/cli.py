"""The `helix` command. Each subcommand lives in its own module and registers itself here.

To add one: give its module an `add_parser(subparsers)` that sets `func=run` with `run(args) -> int`, and
append the module to SUBCOMMANDS (a listed module that does not exist is skipped). User errors are ValueError
and print as one line with exit code 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

# module paths, each with add_parser(subparsers); listed in `helix --help` in this order
SUBCOMMANDS = [
    "helix_compile.planner.command",
    "helix_compile.convert",
    "helix_compile.generate",
    "helix_compile.graph_cmd",
    "helix_compile.bench.command",
]

EPILOG = """examples:
  helix plan --model llama-3.1-405b --gpus 64 --context 1M --dtype fp4 --hw gb200
  helix convert ckpt/ --kvp 2 --tpa 2 -o ckpt-helix/          # one safetensors file per rank + plan.json
  helix convert --verify ckpt-helix/
  helix generate ckpt-helix/ --prompt "Hello" --max-new-tokens 32   # launches the plan's 4 ranks itself
  torchrun --nproc-per-node 4 -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
  helix graph llama --kvp 2 --tpa 2 --html graph.html        # tiny random llama: the graph after each pass
  helix bench --gpus 4 --models mqa,gqa8 --contexts 32K,256K --batches 1,8,32 --out docs/perf   # GPU timings

`helix COMMAND --help` shows each command's options and more examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helix", description="Helix parallelism for HuggingFace causal LMs",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in SUBCOMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is not None and mod.startswith(e.name):  # that command's module does not exist
                continue
            raise
        module.add_parser(sub)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C does: `finally` blocks remove temporary files


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"helix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"helix {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
