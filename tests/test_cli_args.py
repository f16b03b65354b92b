"""Every `helix` subcommand reads layouts, rank counts, dtypes and token counts through the same parsers
(``helix_compile.parse``, by way of ``cli/args.py``), so a flag means one thing everywhere."""

import argparse

import pytest

from helix_compile import parse
from helix_compile.cli import args as shared
from helix_compile.cli import build_parser, main

# the shared flags each command has (a command without ranks, dtype or token counts says so here)
EXPECTED = {
    "plan": {"--layout", "--nproc-per-node", "--dtype", "--context"},
    "convert": {"--layout", "--dtype"},
    "generate": {"--layout", "--nproc-per-node", "--dtype", "--max-new-tokens"},
    "graph": {"--layout", "--prompt-len"},
    "bench": {"--layout", "--nproc-per-node", "--contexts", "--prefill"},
}
TOKEN_FLAGS = {"--context", "--max-new-tokens", "--prompt-len", "--contexts", "--prefill"}


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _action(p, flag):
    return next((a for a in p._actions if flag in a.option_strings), None)


def test_every_command_uses_the_shared_parsers():
    commands = _commands()
    assert set(commands) == set(EXPECTED)
    for name, p in commands.items():
        for flag in EXPECTED[name]:
            action = _action(p, flag)
            assert action is not None, f"helix {name} has no {flag}"
            if flag == "--layout":
                assert action.type.parse is parse.parse_layout, name
            elif flag == "--nproc-per-node":
                assert action.type is shared.positive and action.dest == "nproc", name
                assert {"--nproc-per-node", "--nproc", "--gpus"} <= set(action.option_strings), name
            elif flag == "--dtype":
                assert action.type.parse is parse.parse_dtype, name
            else:
                assert action.type.parse is parse.parse_tokens, (name, flag)
        for field in ("kvp", "tpa", "kv_block"):
            flag = f"--{field.replace('_', '-')}"
            if _action(p, flag) is not None:
                assert _action(p, flag).type is shared.positive, (name, flag)
        # no command has a flag of these kinds outside the shared groups
        for a in p._actions:
            for opt in a.option_strings:
                if opt in TOKEN_FLAGS | {"--gpus", "--nproc", "--nproc-per-node", "--dtype", "--layout", "--layouts"}:
                    assert opt in EXPECTED[name] or opt in ("--gpus", "--nproc", "--layouts"), (name, opt)


def _parse(argv):
    return build_parser().parse_args(argv)


def test_one_unit_and_one_vocabulary():
    assert _parse(["plan", "--context", "128K"]).context == 131072
    assert _parse(["plan", "--context", "1M"]).context == 1_048_576
    assert _parse(["plan", "--context", "1e6"]).context == 1_000_000
    assert _parse(["bench", "--contexts", "32K,1M", "--prefill", "32K"]).contexts == [32768, 1_048_576]
    assert _parse(["generate", "ckpt", "--max-new-tokens", "1K"]).max_new_tokens == 1024
    assert _parse(["graph", "llama", "--kvp", "2", "--prompt-len", "1K"]).prompt_len == 1024
    for argv in (["plan", "--dtype", "bf16"], ["generate", "ckpt", "--dtype", "bf16"],
                 ["convert", "ckpt", "--dtype", "bf16"]):
        assert _parse(argv).dtype == "bfloat16", argv
    assert _parse(["plan", "--dtype", "fp4"]).dtype == "fp4"
    for argv in (["plan", "--gpus", "4"], ["bench", "--nproc", "4"], ["generate", "ckpt", "--nproc-per-node", "4"]):
        assert _parse(argv).nproc == 4, argv
    for argv in (["plan"], ["convert", "ckpt"], ["generate", "ckpt"], ["graph", "llama"]):
        assert _parse(argv + ["--layout", "kvp=2,kv-block=8"]).layout == {"kvp": 2, "kv_block": 8}, argv
    assert _parse(["bench", "--layout", "kvp=2,tpa=1", "--layout", "kvp=1,tpa=2"]).layout == [
        {"kvp": 2, "tpa": 1}, {"kvp": 1, "tpa": 2}]


@pytest.mark.parametrize("argv,message", [
    (["generate", "ckpt", "--dtype", "fp4"], "'fp4' is not a dtype here: use one of auto, bfloat16, float16, float32"),
    (["plan", "--context", "lots"], "argument --context: cannot read 'lots' as a token count"),
    (["bench", "--contexts", "32K,0"], "argument --contexts: must be at least 1, got 0"),
    (["convert", "ckpt", "--layout", "kvp=2,foo=1"], "invalid layout key 'foo'"),
    (["convert", "ckpt", "--layout", "kvp=0"], "invalid layout value kvp='0': must be a positive integer"),
    (["graph", "llama", "--kvp", "2", "--layout", "kvp=2"], "--layout kvp=2 and --kvp 2 both set the layout"),
    (["convert", "ckpt", "--kvp", "-1"], "argument --kvp: must be at least 1, got -1"),
])
def test_bad_values_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
