"""`helix generate`: generate text from a checkpoint on N local ranks (or under torchrun, across hosts).

The work is ``helix_compile.generation`` (its docstring is the contract); this module reads the flags and prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import generation
from . import args as shared

DESCRIPTION = "generate text from a checkpoint on N ranks it launches itself (or one rank per process under torchrun)"
EPILOG = """examples:
  helix generate ckpt/ --prompt "The capital of France is" --max-new-tokens 32
  helix generate ckpt/ --kvp 2 --tpa 2 --dtype float32 --prompt "Hello" --temperature 0.7 --top-p 0.9 --seed 1
  helix generate ckpt-helix/ --prompt "Hello" --prompt "The capital of France is"   # one left-padded batch
  printf 'Hello\\nBonjour\\n' | helix generate ckpt/ --nproc-per-node 2 --prompt-file -   # one prompt per line
  helix generate SmolLM2-135M-Instruct.Q4_1.gguf --nproc-per-node 2 --chat --prompt "What is Helix?"
  torchrun --nproc-per-node 2 -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
      -m helix_compile.cli generate ckpt-helix/ --prompt "Hello"
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = shared.subparser(subparsers, "generate", "generate text on N ranks (spawned here, or under torchrun)",
                         DESCRIPTION, EPILOG)
    p.add_argument("model", help="a helix convert output, an HF checkpoint directory, or a .gguf file")
    src = p.add_argument_group("prompts (one left-padded batch; stdin when neither is given)")
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    src.add_argument("--prompt-file", help="a file with one prompt per line ('-': stdin)")
    src.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    shared.add_tokens(src, "--max-new-tokens", "tokens to generate per prompt", default=32)
    run_ = p.add_argument_group("ranks, layout, dtype and device")
    shared.add_ranks(run_, "ranks to launch here (default: the manifest's, kvp*tpa, or every visible GPU); "
                           "ignored under torchrun")
    shared.add_layout(run_, auto=True, shown={"tpa": "1", "kv_block": "the manifest's, else 16",
                                              "kvp": "the manifest's, else ranks / tpa; neither given: planned"})
    shared.add_dtype(run_, help_text="weights and KV cache (auto: the checkpoint's dtype)")
    shared.add_kv_dtype(run_)
    shared.add_device(run_)
    run_.add_argument("--executor", choices=["inductor", "eager"], default="inductor",
                      help="run the local graph through Inductor (default) or without it")
    smp = p.add_argument_group("decoding (default: the checkpoint's generation_config, as transformers' generate)")
    smp.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                     help="sample (--do-sample) or decode greedily (--no-do-sample)")
    smp.add_argument("--temperature", type=float, help="sampling temperature; 0 means greedy")
    smp.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: no top-k)")
    smp.add_argument("--top-p", type=float, help="sample from the smallest set with probability >= p")
    smp.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1.0: none)")
    smp.add_argument("--seed", type=int, default=0, help="sampling seed, the same on every rank (default 0)")
    flt = p.add_argument_group("faults")
    flt.add_argument("--timeout", type=float, default=60.0,
                     help="seconds a decode step or collective may stall before a rank gives up (default 60)")
    flt.add_argument("--compile-timeout", type=float, default=900.0, help="the same while loading and compiling")
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    p.set_defaults(func=run)
    return p


def read_prompts(args) -> list[str]:
    if args.prompt and args.prompt_file:
        raise ValueError("--prompt and --prompt-file both give prompts: use one")
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file and args.prompt_file != "-":
        file = Path(args.prompt_file)
        if not file.is_file():
            raise ValueError(f"--prompt-file {file}: no such file")
        text = file.read_text()
    elif args.prompt_file == "-" or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe prompts on stdin")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompt: {'the file ' + args.prompt_file if args.prompt_file not in (None, '-') else 'stdin'} "
                         f"has no non-empty line")
    return prompts


def run(args) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    layout = shared.layout_fields(args)
    prompts = read_prompts(args)
    decoding = generation.decoding_kwargs(args.do_sample, args.temperature, args.top_k, args.top_p,
                                          args.repetition_penalty)
    return generation.generate(
        args.model, prompts, layout=layout, nproc=args.nproc, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
        device=args.device, chat=args.chat, generate_kwargs=decoding, seed=args.seed, executor=args.executor,
        timeout=args.timeout, compile_timeout=args.compile_timeout, step_delay=args.step_delay, kv_dtype=args.kv_dtype)
