"""Shared by the real-weights examples: a single-device greedy reference, a safetensors checkpoint of the
de-quantised GGUF model, N gloo ranks that each load their shards (``helix_compile.from_pretrained``) and decode
through ``torch.compile(backend="helix")``, and the comparison of the two texts."""

import os
import tempfile
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantisation progress bar, once per rank
import torch


def add_arguments(p, tpa_help):
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ranks", type=int, default=2, help="N = kvp * tpa gloo processes")
    p.add_argument("--kvp", type=int, help="KV-parallel width (default: ranks // tpa)")
    p.add_argument("--tpa", type=int, default=1, help=tpa_help)
    p.add_argument("--kv-block", type=int, default=16, help="tokens per round-robin KV block")
    p.add_argument("--executor", choices=["inductor", "eager"], default="inductor")


def check_layout(p, args, config):
    args.kvp = args.kvp or args.ranks // args.tpa
    if args.kvp * args.tpa != args.ranks:
        p.error(f"kvp*tpa = {args.kvp}*{args.tpa} must equal --ranks {args.ranks}")
    from helix_compile import Layout
    try:  # fail here, not in N ranks
        Layout(kvp=args.kvp, tpa=args.tpa, kv_block=args.kv_block).validate(config)
    except ValueError as e:
        p.error(str(e))


def save_checkpoint(model, folder):
    """config.json + model.safetensors of the de-quantised weights (transformers refuses to save a GGUF model)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(model, str(Path(folder) / "model.safetensors"))  # drops the tied lm_head copy


@torch.no_grad()
def greedy(model, ids, cache, steps, eos):
    """Prefill, then q_len=1 decode steps. Returns (new token ids, last-position logits per step, seconds per call)."""
    tokens, logits, times = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        times.append(time.perf_counter() - t0)
        logits.append(out)
        ids = out.argmax(-1, keepdim=True)
        tokens.append(ids.item())
        if tokens[-1] == eos:
            break
    return tokens, torch.cat(logits), times


def rank_main(rank, args, checkpoint, ids, eos):
    """One gloo rank (started by ``helix_compile.launch.run_ranks``): rank 0 returns its tokens, logits, step times,
    weight and cache bytes."""
    import helix_compile
    from helix_compile import Layout, StaticCache, shards

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    layout = Layout(kvp=args.kvp, tpa=args.tpa, kv_block=args.kv_block)
    model = helix_compile.from_pretrained(checkpoint, layout)  # this rank's shards only
    held = sum(p.nbytes if not shards.is_virtual(p) else sum(shards.lookup(p, k).nbytes for k in shards.keys_of(p))
               for p in model.parameters())
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=ids.shape[1] + args.max_new_tokens,
                        layout=layout)
    compiled = torch.compile(model, backend="helix", options={"layout": layout, "executor": args.executor},
                             fullgraph=True)
    tokens, logits, times = greedy(compiled, ids, cache, args.max_new_tokens, eos)
    # numpy: no shared-memory handle to outlive the rank
    return (tokens, logits.numpy(), times, held, cache.nbytes) if rank == 0 else None


def compare_on_ranks(model, tok, ids, args, prompt: str, reference_cache) -> int:
    """Greedy text of ``model`` on one device, then on ``args.ranks`` helix ranks; print both. 0 if identical."""
    t0 = time.perf_counter()
    ref_tokens, ref_logits, ref_times = greedy(model, ids, reference_cache, args.max_new_tokens, tok.eos_token_id)
    ref_s = time.perf_counter() - t0
    full_bytes = sum(p.nbytes for p in model.parameters())
    checkpoint = tempfile.mkdtemp(prefix="helix-example-")
    save_checkpoint(model, checkpoint)
    del model

    from helix_compile.launch import run_ranks

    t0 = time.perf_counter()
    results = run_ranks(args.ranks, rank_main, args, checkpoint, ids, tok.eos_token_id, share_cores=True)
    tokens, logits, times, held, cache_bytes = results[0]
    helix_s = time.perf_counter() - t0
    logits = torch.from_numpy(logits)

    ref_text, text = tok.decode(ref_tokens), tok.decode(tokens)
    steps = min(len(ref_tokens), len(tokens))
    diff = (logits[:steps] - ref_logits[:steps]).abs().max().item()
    scale = ref_logits[:steps].abs().max().item()

    def ms(ts):  # mean of the decode steps after the first (the first two calls also compile under helix)
        return f"{1000 * sum(ts[2:]) / max(1, len(ts[2:])):.0f} ms/token"

    print(f"prompt ({ids.shape[1]} tokens): {prompt!r}")
    print(f"single device : {ref_text!r}")
    print(f"helix {args.ranks} ranks: {text!r}")
    print(f"  layout kvp={args.kvp} tpa={args.tpa} kv_block={args.kv_block}, executor={args.executor}")
    print(f"identical text: {ref_text == text}; max |logit diff| over {steps} steps: {diff:.2e} "
          f"(relative to the largest |logit|, {scale:.1f}: {diff / scale:.1e})")
    print(f"single device: {ref_s:.1f}s for {len(ref_tokens)} tokens, decode {ms(ref_times)}")
    print(f"rank 0 holds {held / 2**20:.1f} MiB of weights (the model: {full_bytes / 2**20:.1f} MiB; embeddings and "
          f"norms are replicated) and {cache_bytes / 2**10:.0f} KiB of KV cache")
    print(f"helix: {helix_s:.1f}s incl. spawn + load; rank 0: prefill+compile {times[0]:.1f}s, first decode step "
          f"(+compile) {times[1] if len(times) > 1 else 0:.1f}s, decode {ms(times)}")
    shutil.rmtree(checkpoint, ignore_errors=True)
    return 0 if ref_text == text else 1
