"""The coverage table: every causal-LM model type of transformers, built from a small config, under helix.

    python tools/coverage.py [--world 2] [--world 4] [--steps 12] [--only llama,gpt2] [--out docs/coverage.md]
    python tools/coverage.py --only llama,gpt2 --merge docs/coverage.json    # re-run some, keep the rest
    python tools/coverage.py --render                                        # rewrite the page from the JSON
    python tools/coverage.py --dtype bfloat16 --tested-first --stop-after 55 --merge docs/coverage.json

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random fp32 model (2 layers, hidden 64,
4 query heads, 2 KV heads where the family has the notion, sliding windows of 12 positions where it has them,
random biases), then on real gloo ranks (``--world``, eager executor) greedy-decode a batch of 2 prompts of 7
tokens for ``--steps`` steps with every layout (kvp, tpa) that applies, against single-device transformers with
its own StaticCache, kv_block=4 so the decode steps cross blocks and ranks. A cell says ``exact`` (max relative
logit error, greedy tokens identical, logits identical on every rank), or the error helix (or transformers)
raised. ``WRONG`` (tokens or logits differ without an error) must never appear.

``--dtype bfloat16`` runs the same with the fp32 model cast to bf16, judged as the GPU smoke run judges bf16: both
helix and single-device transformers in bf16 read the fp32 model's greedy tokens (teacher forcing), and a cell is
``within`` when helix's relative logit error against the fp32 model is at most twice transformers' own (``BOUND``)
and every rank's logits are identical. Its results sit beside the fp32 ones in the JSON (a family's ``"bfloat16"``
key) and fp32 runs keep them; the page has a column for each precision (``not run`` where a family has no result).

Ranks process the families one after another in one process group; a family that hangs or kills a rank is
recorded as such and the ranks restart after it. The raw results go to ``--json`` (default: ``--out`` with
``.json``) with a record of each run that produced them (date, commit, versions, command, families: key
``_runs``); the page ``--out`` is rendered from that file alone, so ``--render`` regenerates it without running.

gemma3n (its vision tower) needs ``timm``, which needs a ``torchvision`` built for the installed torch. None exists
for torch 2.13.0+cpu on PyPI (its torchvision 0.28.0 is a CUDA build and
fails to import beside it: "operator torchvision::nms does not exist"; and a broken torchvision would also break
transformers' other imports), so it is no extra here and gemma3n stays ``build`` on CPU; where torch has a matching
torchvision, ``pip install timm`` makes it build.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from queue import Empty

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=12, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, ffn_hidden_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    decoder_start_token_id=0, layer_norm_epsilon=1e-5, tie_word_embeddings=False, rotary_dim=8,
    is_decoder=True,  # encoder families used as causal LMs (BertLMHeadModel ...): transformers asks for it
    attention_type="original_full",  # BigBird: what its decoder runs with a cache anyway (block_sparse switches to it
    # with a logger.warning, modeling_big_bird.py, that Dynamo cannot trace)
    default_language="en_XX",  # X-MOD: the language adapter to run (its only one by default)
)
PROMPT_LEN, BATCH, KV_BLOCK, TOL = 7, 2, 4, 1e-5
# Precisions a run can be in. float32 results sit under a family's world keys ({"2": per rank}); a lower precision's
# under its name beside them ({"2": ..., "bfloat16": {"2": ...}}). A family name handed to the ranks carries a lower
# precision as a suffix: "llama@bfloat16".
LOW_DTYPES = ("bfloat16",)
BOUND = 2  # a low-precision cell is within when helix's error against fp32 is at most BOUND x one device's own
# Families whose config needs more than SMALL to build with 2 layers, or derives an attribute SMALL would override


def _read_only(cls, name: str) -> bool:
    """A property without a setter (FalconConfig.head_dim): derived from other fields, not a constructor argument."""
    attr = getattr(cls, name, None)
    return isinstance(attr, property) and attr.fset is None

# Per-family corrections to SMALL, keyed by model_type: for families whose config ties sizes together (transformers
# cannot build or run them from SMALL alone). Each entry is passed to the family's config class as is, on top of
# the SMALL values it has (for a composite config: into its text part). Keep one line of why per entry.
_MLA = dict(  # multi-head latent attention: head_dim is the rotary part (qk_rope_head_dim), as DeepSeek sets it
    kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
    num_key_value_heads=4,
)
FAMILY_CONFIG = {
    "deepseek_v2": {**_MLA, "q_lora_rank": None, "first_k_dense_replace": 1},  # V2-Lite: no q compression
    "deepseek_v3": {**_MLA, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},
    "axk1": {**_MLA, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},  # DeepSeek-V3's MLA + MoE
    "glm4_moe_lite": {**_MLA, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
    "longcat_flash": {**_MLA, "num_layers": 2, "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "moe_topk": 2},
    "sarvam_mla": {**_MLA, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
    "youtu": _MLA,
    "minicpm3": _MLA,
    # DBRX: attention and FFN sizes live in sub-configs (its attention reads attn_config.rope_theta)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=97,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),  # DBRX-base clips at 8
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    # LFM2-MoE: layer_types is not derived from the layer count (LFM2's is: all attention, as used here too);
    # layer 0 dense, layer 1 MoE
    "lfm2_moe": dict(layer_types=["full_attention", "full_attention"], num_dense_layers=1),
    "zaya": dict(num_experts_per_tok=1),  # ZAYA routes each token to one expert only
    "mimo_v2_flash": dict(v_head_dim=8),  # values narrower than keys, as in the model (192 / 128)
    # DiffLLaMA pairs query head h with h + Q/2 and KV head g with g + K/2: a rank holds the same block of each half,
    # so every layout of 4 ranks needs 8 query and 8 KV heads (tpa | K/2, kvp | Q/2/tpa; layout._HEAD_PARTS)
    "diffllama": dict(num_attention_heads=8, num_key_value_heads=8),
    "gpt_bigcode": dict(num_key_value_heads=None),  # derived from multi_query (MQA: 1 KV head); None = not set
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=12),  # one global + one local layer
    "cohere_compass_text": dict(rope_parameters={  # its default config has none, so transformers cannot build it
        t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("full_attention", "sliding_attention")}),
    # 4 layers (sliding, full, sliding, full); the last 2 reuse the KV of layers 0 and 1 (kv-shared layers);
    # the per-layer input embedding (262144 x layers*256 by default) and LAuReL shrunk
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8,
                         laurel_rank=8, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    # full-attention layers have their own head_dim (global_head_dim, 512 by default) and KV heads, and values that
    # are the keys' projection (attention_k_eq_v, as in Gemma 4 31B); the last 2 layers kv-shared
    "gemma4_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                        num_kv_shared_layers=2, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8),
    "gemma4_unified_text": dict(global_head_dim=32),
    # layer 0 chunked attention with RoPE and a dense FFN, layer 1 full attention without (NoPE) and MoE (dense and
    # MoE layers interleaved, as in the 128E model); chunks of 8 positions, so the decode steps cross a chunk;
    # attention temperature tuning from position 4 on
    # an MTP drafter over a Gemma 4 backbone's KV: its text layers all reuse the backbone's (kv-shared) KV and have
    # no per-layer input embedding (its config refuses one)
    "gemma4_assistant": dict(num_kv_shared_layers=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0),
    "gemma4_unified_assistant": dict(num_kv_shared_layers=2),  # likewise: every layer reuses the backbone's KV
    # Dots 3 Note: MLA with per-layer-type sizes (one indexed (DSA) layer, one sliding-window layer, as its schedule
    # starts), as many KV heads as query heads (its config requires it); the indexer keeps 8 keys, fewer than the
    # decode reaches, so its sparse selection stays on
    "dots3_note_text": {**_MLA, "num_key_value_heads": 4, "head_dim": 24, "n_group": 2, "topk_group": 1,
                        "layer_types": ["indexed_attention", "sliding_attention"], "index_topk": 8,
                        "index_head_dim": 16, "index_n_heads": 2, "shared_experts_intermediate_size": 32,
                        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 48,
                        "swa_kv_lora_rank": 32, "swa_head_dim": 24, "swa_qk_nope_head_dim": 16,
                        "swa_v_head_dim": 16},
    # hybrids of state-space (Mamba) layers and attention: one of each (their default patterns are for 38+ layers)
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"]),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"]),
    "mamba2": dict(num_heads=8, n_groups=2),  # hidden_size * expand = num_heads * head_dim (64 * 2 = 8 * 16)
    "llama4_text": dict(no_rope_layer_interval=2, attention_chunk_size=8, floor_scale=4, interleave_moe_layer_step=2,
                        intermediate_size_mlp=32),
}

# Per composite model_type: arguments of the composite config itself (not its text part), for families whose
# default config does not validate or whose other towers must agree with the small text part. Used to build the
# default config too. Keep one line of why per entry.
OUTER_CONFIG = {
    # its default text config has a per-layer input embedding, which the assistant's own config refuses
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)),
    # the vision and audio adapters must project to the text width (64); the towers shrunk to one small layer
    # (their defaults are 42 and 32 layers of width 1536 and 1280)
    "dots3_note": dict(
        text_config=dict(hidden_size=64),  # for the default config only (the text part is then sized as any other)
        vision_config=dict(adapter_out_dim=64, hidden_size=64, adapter_in_dim=64, intermediate_size=96,
                           num_hidden_layers=1, num_attention_heads=4, moe_intermediate_size=32,
                           pyramid_num_routed=[-1]),
        audio_config=dict(adapter_out_dim=64, hidden_size=64, adapter_input_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=4, downsample_hidden_size=32)),
}


# Per text model type: what the sizes above leave invalid or huge, set so that the family's own features stay on
# in the small model (each value is a size or a layer pattern, never a switch that turns a feature off).


def _has(config, key: str) -> bool:
    """``hasattr`` that also answers for per-layer attributes (Gemma 4), whose global read raises."""
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001  transformers' AmbiguousGlobalPerLayerAttributeError
        return key in getattr(type(config), "__dataclass_fields__", {})


def small_config(model_type: str):
    """The family's config with the small sizes above, set only where the family has that attribute."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    outer = OUTER_CONFIG.get(model_type, {})
    default = cls(**outer)
    text = default.get_text_config(decoder=True)
    kw = {k: v for k, v in SMALL.items() if _has(text, k) and not _read_only(type(text), k)}
    family = {**FAMILY_CONFIG.get(text.model_type, {}), **FAMILY_CONFIG.get(model_type, {})}  # text part, family
    kw = {k: v for k, v in {**kw, **family}.items() if v is not None}  # None: not set
    if getattr(default, "is_encoder_decoder", False):
        raise NotImplementedError("an encoder-decoder model: helix parallelises decoder-only causal LMs")
    sub = [k for k, v in vars(default).items() if v is text and k != "self"]
    if text is default or not sub:
        return cls(**kw)
    layers = text.to_dict().get("num_hidden_layers")
    base = {k: v for k, v in text.to_dict().items()  # per-layer lists are recomputed for the new layer count
            if not (isinstance(v, (list, dict)) and len(v) == layers) and k not in ("layer_types", "per_layer_config")}
    return cls(**{**outer, sub[0]: {**base, **kw}})  # a composite (multimodal) config: size its text part


def build(model_type: str, seed: int = 0):
    import torch

    from helix_compile.loading import model_from_config

    cfg = small_config(model_type)
    torch.manual_seed(seed)  # a failed SDPA build raises before it draws any weight
    model = model_from_config(cfg).float().eval()  # SDPA, or the family's eager attention where it has none
    attn = model.config._attn_implementation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # HF initialises biases to 0, which would hide a bias added twice
    return model, attn


def layouts(config, world: int):
    """(kvp, tpa, ep) with kvp * tpa = world that Layout.validate accepts for this config, or (kvp, tpa, ep,
    "n/a: why"): ep = 1 for every (kvp, tpa); a mixture-of-experts config adds kvp = world, ep = world (the routed
    experts split over all ranks, tpf = 1)."""
    from helix_compile import Layout
    from helix_compile.layout import moe_experts

    text = config.get_text_config(decoder=True)
    candidates = [(world // tpa, tpa, 1) for tpa in (1, 2, 4) if world % tpa == 0]
    try:
        moe = moe_experts(text) is not None
    except (AttributeError, TypeError):
        moe = False
    if moe and world > 1:
        candidates.append((world, 1, world))
    out = []
    for kvp, tpa, ep in candidates:
        try:
            Layout(kvp, tpa, ep=ep, kv_block=KV_BLOCK).validate(text)
            out.append((kvp, tpa, ep))
        except (ValueError, AttributeError, TypeError) as e:
            out.append((kvp, tpa, ep, f"n/a: {e}"))
    return out


def _key(kvp: int, tpa: int, ep: int) -> str:
    return f"kvp{kvp}-tpa{tpa}" + (f"-ep{ep}" if ep > 1 else "")


def short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "\\|")
    for marker in ("Explanation:", "from user code:", "Set TORCHDYNAMO_VERBOSE"):
        text = text.split(marker)[0]
    return text.strip()[:300]


UNTRACEABLE_MARKERS = ("data-dependent", "Data-dependent", "unbacked", "Unbacked")


def split_dtype(name: str):
    """"llama@bfloat16" -> ("llama", "bfloat16"); "llama" -> ("llama", "float32")."""
    model_type, _, dtype = name.partition("@")
    return model_type, dtype or "float32"


def compare_as_user(model, layout, ids, steps, max_len, **kw):
    """``compare`` with the bare call (input_ids and the cache); when Dynamo cannot trace that call (a family that
    derives its positions or mask from the static cache's length, a tensor), again with the attention_mask and
    position_ids ``generate`` passes. Returns (report, None) or (report, the bare call's error). ``kw``: more of
    ``compare``'s arguments (reference, teacher_forcing)."""
    from helix_compile.testing import compare

    try:
        return compare(model, layout, ids, steps, max_len, **kw), None
    except Exception as e:  # noqa: BLE001
        if not any(m in str(e) for m in UNTRACEABLE_MARKERS):
            raise
        import torch

        torch._dynamo.reset()
        return compare(model, layout, ids, steps, max_len, call="generate", **kw), short(e)


def single_device_error(low, fp32, ids, steps, max_len, call="bare") -> float:
    """max |low - fp32| / max |fp32| of single-device transformers' low-precision model against the fp32 model, both
    fed the fp32 model's greedy tokens (as ``compare(..., reference=fp32, teacher_forcing=True)`` feeds helix), with
    the same call as helix's (``call``: "bare" or "generate", see ``compare_as_user``)."""
    import torch
    from transformers import StaticCache as HFStaticCache

    from helix_compile.testing import generate_inputs

    extra = (lambda m, t, past: generate_inputs(m, t, past)) if call == "generate" else (lambda m, t, past: {})
    c_low, c_ref = HFStaticCache(low.config, max_cache_len=max_len), HFStaticCache(fp32.config, max_cache_len=max_len)
    err = scale = 0.0
    tok, past = ids, 0
    with torch.no_grad():
        for _ in range(steps + 1):
            a = low(input_ids=tok, past_key_values=c_low, **extra(low, tok, past)).logits[:, -1].float()
            b = fp32(input_ids=tok, past_key_values=c_ref, **extra(fp32, tok, past)).logits[:, -1]
            err, scale = max(err, (a - b).abs().max().item()), max(scale, b.abs().max().item())
            past += tok.shape[1]
            tok = b.argmax(-1, keepdim=True)
    return err / max(scale, 1e-30)


def judged_compare(model, layout, ids, steps, max_len, fp32=None):
    """One layout's run. fp32 (``fp32`` None): helix against single-device transformers on the same model, each on
    its own greedy tokens. Low precision (``model`` is ``fp32`` cast): helix and single-device transformers, both in
    the low precision and teacher-forced on the fp32 model's tokens, each against the fp32 model; ``single`` is
    transformers' error, the bound for helix's. Returns (the cell's fields, the bare call's error or None)."""
    if fp32 is None:
        r, bare = compare_as_user(model, layout, ids, steps, max_len)
        return {"err": r.max_rel_err, "tokens_equal": r.tokens_equal, "logits": r.logits}, bare
    r, bare = compare_as_user(model, layout, ids, steps, max_len, reference=fp32, teacher_forcing=True)
    single = single_device_error(model, fp32, ids, steps, max_len, call="generate" if bare else "bare")
    return {"err": r.max_rel_err, "single": single, "tokens_equal": r.tokens_equal, "logits": r.logits}, bare


def build_in(model_type: str, dtype: str):
    """(model, attention implementation, the fp32 model or None): ``build``, cast to ``dtype`` (weights and buffers,
    as ``model.to(dtype)`` does) when it is not float32, beside the fp32 model it was cast from."""
    import copy

    import torch

    model, attn = build(model_type)
    if dtype == "float32":
        return model, attn, None
    return copy.deepcopy(model).to(getattr(torch, dtype)), attn, model


def run_family(name: str, world: int, steps: int):
    """``name``: a model type, with "@dtype" for a lower precision (``split_dtype``)."""
    import torch

    from helix_compile import Layout

    model_type, dtype = split_dtype(name)
    try:
        model, attn, fp32 = build_in(model_type, dtype)
    except Exception as e:  # noqa: BLE001  recorded in the table
        return {"status": "build", "message": short(e)}
    text = model.config.get_text_config(decoder=True)
    res = {"status": "ok", "class": type(model).__name__, "attn": attn, "cells": {}}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, text.vocab_size, (BATCH, PROMPT_LEN), generator=g)
    for lay in layouts(model.config, world):
        key = _key(*lay[:3])
        if len(lay) == 4:
            res["cells"][key] = {"status": "n/a", "message": lay[3][5:]}
            continue
        torch._dynamo.reset()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fields, bare = judged_compare(model, Layout(lay[0], lay[1], ep=lay[2], kv_block=KV_BLOCK), ids, steps,
                                              PROMPT_LEN + steps + 1, fp32)
            whole = sorted({str(w.message).split(":")[0] for w in caught if str(w.message).startswith("helix leaves")})
            res["cells"][key] = {"status": "ran", **fields, "whole": whole, "bare": bare}
        except Exception as e:  # noqa: BLE001
            res["cells"][key] = {"status": "error", "message": short(e), "trace": traceback.format_exc()[-2000:]}
    return res


def probe(name: str) -> dict:
    """One process, no ranks: build the family and compile it under helix with Layout(1) (detection and planning
    run as on N ranks; layout-independent refusals show here), prefill + 2 decode steps against transformers, judged
    as a cell of the same precision is (``name``: see ``run_family``)."""
    import torch

    from helix_compile import Layout

    model_type, dtype = split_dtype(name)
    try:
        model, attn, fp32 = build_in(model_type, dtype)
    except Exception as e:  # noqa: BLE001  recorded in the table
        return {"status": "build", "message": short(e)}
    text = model.config.get_text_config(decoder=True)
    ids = torch.randint(3, text.vocab_size, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    try:  # transformers itself, with its own StaticCache
        from transformers import StaticCache as HFStaticCache

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, past_key_values=HFStaticCache(model.config, max_cache_len=PROMPT_LEN + 3))
    except Exception as e:  # noqa: BLE001
        return {"status": "build", "message": "transformers cannot run it from this config: " + short(e)}
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r, _ = judged_compare(model, Layout(1, kv_block=KV_BLOCK), ids, 2, PROMPT_LEN + 3, fp32)
    except Exception as e:  # noqa: BLE001
        return {"status": "refused", "message": short(e), "class": type(model).__name__, "attn": attn}
    if fp32 is None and (r["err"] >= TOL or not r["tokens_equal"]):
        return {"status": "WRONG", "message": f"WRONG on one rank: max rel err {r['err']:.1e}, tokens equal "
                f"{r['tokens_equal']}", "class": type(model).__name__, "attn": attn}
    if fp32 is not None and r["err"] > BOUND * r["single"]:
        return {"status": "WRONG", "message": f"WRONG on one rank: {dtype} rel err against fp32 {r['err']:.1e}, over "
                f"{BOUND} x one device's {r['single']:.1e}", "class": type(model).__name__, "attn": attn}
    return {"status": "ok"}


def worker(rank, families, steps, queue):
    """One gloo rank (``helix_compile.launch.spawn``): every family in turn, each reported as it starts and ends."""
    import torch
    import torch.distributed as dist

    from helix_compile.launch import init_process_group

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    init_process_group("cpu", timeout=180)
    world = dist.get_world_size()
    for fam in families:
        queue.put((rank, fam, "start", None))
        queue.put((rank, fam, "done", run_family(fam, world, steps)))
    dist.destroy_process_group()
    return 0


def run_world(families, world, steps, per_family_s=240, log=print):
    """{family: [result of each rank]}; a family that hangs or crashes a rank gets {"status": "crash"}, and the
    ranks start again on the families left."""
    import torch.multiprocessing as mp

    from helix_compile.launch import spawn, stop

    ctx = mp.get_context("spawn")
    results, pending = {}, list(families)
    while pending:
        queue = ctx.Queue()
        procs = spawn(world, worker, (pending, steps, queue), context=ctx)
        got, current, last = {}, pending[0], time.time()
        while len(results) < len(families):
            try:
                rank, fam, what, value = queue.get(timeout=5)
            except Empty:
                dead = [p for p in procs if not p.is_alive()]
                if time.time() - last > per_family_s or (dead and any(p.exitcode for p in dead)):
                    results[current] = [{"status": "crash", "message": f"a rank hung or died (exit codes "
                                         f"{[p.exitcode for p in procs]}) on {current}"}]
                    log(f"{current}: crash")
                    break
                continue
            last = time.time()
            if what == "start":
                current = fam
                continue
            got.setdefault(fam, {})[rank] = value
            if len(got[fam]) == world:
                results[fam] = [got[fam][r] for r in range(world)]
                log(f"{fam}: {summary(results[fam])}")
        stop(procs, grace=1.0)
        pending = [f for f in families if f not in results]
    return results


def cell(per_rank, key):
    cells = [r.get("cells", {}).get(key) for r in per_rank]
    c = cells[0]
    if c is None:
        return None
    if c["status"] == "ran-log":  # recovered from a log: the verdict only
        return {"status": c["verdict"] if c["verdict"] != "WRONG" else "WRONG", "message": c["verdict"],
                "err": float("nan"), "tokens_equal": c["verdict"] == "exact", "same": True}
    if c["status"] != "ran":
        return c
    if any(x is None or x["status"] != "ran" for x in cells):
        return {"status": "error", "message": "ranks disagree on whether the run succeeded"}
    same = all(x["logits"] == c["logits"] for x in cells)
    out = {"err": c["err"], "tokens_equal": c["tokens_equal"], "same": same, "whole": c.get("whole", []),
           "bare": c.get("bare")}
    if "single" in c:  # low precision: against fp32, bounded by one device's own error (``judged_compare``)
        within = c["err"] <= BOUND * c["single"] and same
        return {"status": "within" if within else "WRONG", "single": c["single"], **out}
    exact = c["err"] < TOL and c["tokens_equal"] and same
    return {"status": "exact" if exact else "WRONG", **out}


def summary(per_rank) -> str:
    r = per_rank[0]
    if r["status"] != "ok":
        return f"{r['status']}: {r['message'][:120]}"
    return ", ".join(f"{k}={cell(per_rank, k)['status']}" for k in r["cells"])


GOOD = ("exact", "within")  # a cell's verdicts that pass: fp32's and a low precision's


def classify(per_rank) -> str:
    """exact (within, in low precision) | refused-no-kv-cache | refused-hybrid | refused | wrong | build (not
    counted) | n/a"""
    r = per_rank[0]
    if r["status"] == "build":
        return "build"
    if r["status"] == "crash":
        return "error"
    cells = [cell(per_rank, k) for k in r["cells"]]
    ran = [c for c in cells if c["status"] != "n/a"]
    if any(c["status"] == "WRONG" or c.get("message", "").startswith("WRONG") for c in ran):
        return "wrong"
    if not ran:
        return "n/a"
    if all(c["status"] in GOOD for c in ran):
        return ran[0]["status"]
    if any("layers without softmax attention over a KV cache" in c.get("message", "") for c in ran):
        return "refused-hybrid"  # some softmax attention layers, and linear / indexed / state-space ones
    if any("softmax attention over a KV cache" in c.get("message", "") for c in ran):
        return "refused-no-kv-cache"
    if any(c["status"] in GOOD for c in ran):
        return "partly"
    return "refused"


CAUSES = [  # (substring of the error, cause): first match wins
    ("encoder-decoder", "encoder-decoder model (not a decoder-only causal LM)"),
    ("transformers cannot run it", "transformers itself fails with the small config"),
    ("multi-head latent attention", "MLA (multi-head latent attention)"),
    ("mixture-of-experts", "MoE FFN (mixture of experts)"),
    ("no softmax attention over a KV cache (no num_attention_heads", "state-space / RWKV-like: no KV cache attention"),
    ("chunked-attention layers", "chunked attention (Llama 4: keys masked to the query's chunk)"),
    ("layers without softmax attention", "hybrid with linear / indexed / state-space layers"),
    ("without a mask over the cache", "bidirectional attention (an encoder)"),
    ("mask carries a bias", "additive attention bias (ALiBi, relative positions)"),
    ("not followed by an attention helix understands", "attention form helix does not recognise (e.g. ALiBi baddbmm)"),
    ("between the attention and its output projection", "an op over all heads between attention and o_proj"),
    ("is not a per-head op", "an op mixing heads between the projections and attention"),
    ("backend='helix'", "other structure helix refuses (see the row)"),
    ("Dynamo", "torch.compile(fullgraph=True) cannot trace the family"),
    ("data-dependent", "torch.compile(fullgraph=True) cannot trace the family"),
    ("Data-dependent", "torch.compile(fullgraph=True) cannot trace the family"),
    ("unbacked", "torch.compile(fullgraph=True) cannot trace the family"),
    ("Unsupported", "torch.compile(fullgraph=True) cannot trace the family"),
    ("fake tensor", "the family's shapes disagree with its config in the traced model (unclear; see the row)"),
]


def _cause(message: str) -> str:
    return next((c for pattern, c in CAUSES if pattern in message), "other (see the row)")


RUN_KEY = "_runs"  # in the results JSON: how each part of it was produced (see ``run_record``)


def run_record(argv, families, steps, seconds, dtype="float32") -> dict:
    """Where one invocation's results come from: date, commit, versions, command, the families it ran, in which
    precision."""
    import subprocess

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"date": str(datetime.date.today()), "commit": commit, "torch": torch.__version__,
            "transformers": transformers.__version__, "command": "python tools/coverage.py " + " ".join(argv),
            "minutes": round(seconds / 60), "steps": steps, "families": families, "dtype": dtype}


def _provenance(runs) -> list:
    lines = []
    for r in runs:
        fams = r["families"]
        dtype = r.get("dtype", "float32")
        what = "every model type" if fams == "all" else f"{len(fams)} model type{'s' * (len(fams) != 1)} " + (
            "re-run" if dtype == "float32" else "run")
        lines.append(f"- {r['date']}, commit {r['commit']}: `{r['command']}` ({r['minutes']} min, 2-core CPU): "
                     f"{what} in {dtype}; torch {r['torch']}, transformers {r['transformers']}, gloo, eager executor.")
    return lines


def load(text: str):
    """(results, runs) from the results file's text: results[family] = {world: per rank (fp32), dtype: {world: per
    rank}} for each lower precision run (``LOW_DTYPES``), runs = its ``_runs`` record."""
    import json

    raw = json.loads(text)
    runs = raw.pop(RUN_KEY, [])
    return {f: {(k if k in LOW_DTYPES else int(k)): ({int(w): per for w, per in v.items()} if k in LOW_DTYPES else v)
                for k, v in per.items()} for f, per in raw.items()}, runs


def dump(results: dict, runs) -> str:
    import json

    return json.dumps({**results, RUN_KEY: runs}, default=str)


def worlds_of(results: dict) -> list:
    """The world sizes the fp32 results cover."""
    return sorted({w for v in results.values() for w in v if isinstance(w, int)})


def _low_cell(c) -> str:
    if c is None:
        return ""
    if c["status"] in ("within", "WRONG"):
        return (f"{c['status']} {c['err']:.1e} vs {BOUND} × {c['single']:.1e}"
                + ("" if c["same"] else ", ranks differ")
                + (f"; left whole (replicated): {'; '.join(c['whole'])}" if c.get("whole") else "")
                + ("; with generate's attention_mask and position_ids" if c.get("bare") else ""))
    return f"{c['status']}: {c['message']}"


def render_low(results: dict, worlds, dtype: str) -> list:
    """The lines of the ``dtype`` part of the page: its rule, summary and one table per world."""
    runs = {f: v[dtype] for f, v in results.items() if dtype in v}
    kinds = {f: classify(per[worlds[0]]) for f, per in runs.items() if worlds[0] in per}
    count = {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))}
    lines = [
        f"## {dtype}", "",
        f"The same model cast to {dtype} (`model.to(torch.{dtype})`: weights and buffers) runs the same prompts and "
        "layouts, teacher-forced on the fp32 model's greedy tokens (so a near-tie that flips a low-precision argmax "
        "does not end the comparison). A cell is **within** when helix's maximum relative logit error against the "
        f"fp32 model is at most {BOUND} × single-device transformers' own {dtype} error against the fp32 model (same "
        "tokens, same call), and every rank's logits are identical; otherwise `WRONG`. The cells show helix's error "
        f"vs {BOUND} × transformers'. `not run` (in the tables above): no {dtype} result for the family yet.",
        "",
        f"**Summary ({len(kinds)} of {len(results)} model types run in {dtype}):** "
        + (", ".join(f"{k}: {v}" for k, v in count.items()) or "none") + ".",
        "",
    ]
    for world in worlds:
        keys = sorted({k for per in runs.values() for r in per.get(world, [{}])[:1] for k in r.get("cells", {})}
                      - {"probe"})
        lines += [f"### {world} ranks, {dtype}", "", "| model type | verdict | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for fam in sorted(runs):
            per = runs[fam].get(world)
            if per is None:
                continue
            r = per[0]
            if r["status"] != "ok" or "probe" in r["cells"]:
                lines.append(f"| {fam} | {classify(per)} | {r['message']} |" + " |" * (len(keys) - 1))
                continue
            lines.append("| " + " | ".join([fam, classify(per)] + [_low_cell(cell(per, k)) for k in keys]) + " |")
        lines.append("")
    return lines


def render(results: dict, worlds, steps, runs) -> str:
    """The Markdown table from the results and their provenance ``runs`` (oldest first); nothing else is read."""
    kinds = {}
    for fam, per_world in results.items():
        kinds[fam] = classify(per_world[worlds[0]]) if worlds[0] in per_world else "build"
    attention = [f for f, k in kinds.items() if k not in ("build", "refused-no-kv-cache", "refused-hybrid")]
    exact = [f for f in attention if kinds[f] == "exact"]
    hybrid = [f for f, k in kinds.items() if k == "refused-hybrid"]
    count = {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))}
    lines = [
        "# Coverage: transformers' causal-LM families under helix",
        "",
        "Generated by `tools/coverage.py` from its results file (the `.json` beside this page); do not edit by hand. "
        "`python tools/coverage.py --render` rewrites this page from that file; a run of the tool (below) "
        "updates both. The results come from these runs (a later run's families replace the earlier results):",
        "",
        *_provenance(runs),
        "",
        "Each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from a small random fp32 config (2 layers, "
        "hidden 64, 4 query heads, 2 KV heads where the family has them, sliding windows of 12 positions where it "
        "has them, random biases) and greedy-decodes a batch of 2 prompts of 7 tokens for "
        f"{steps} steps (kv_block=4, so decode crosses blocks and ranks), against single-device transformers. "
        "**exact**: relative logit error below 1e-5, greedy tokens identical, logits identical on every rank. "
        "Otherwise the cell shows the error raised. `WRONG` would mean a silent mismatch; there must be none. "
        "The `fp32` column is this verdict; " + ", ".join(f"the `{d}` column the verdict in {d}" for d in LOW_DTYPES)
        + " (its rule and cells: the section of that name at the end of this page).",
        "",
        f"**Summary ({len(kinds)} model types):** " + ", ".join(f"{k}: {v}" for k, v in count.items()) + ".  ",
        f"**Attention-based families that build: {len(exact)} / {len(attention)} exact "
        f"({100 * len(exact) / max(1, len(attention)):.1f}%)**; the rest are refused with the error shown "
        "(`build` = transformers cannot build or run the family from a small config; `refused-no-kv-cache` = no "
        "softmax attention over a KV cache, e.g. state-space / RWKV-like; `refused-hybrid` = softmax attention "
        "layers mixed with linear, indexed (sparse top-k) or state-space layers, which helix does not run; "
        "`partly` = exact on some layouts, refused on others). Counting the hybrids as attention-based too: "
        f"{len(exact)} / {len(attention) + len(hybrid)} "
        f"({100 * len(exact) / max(1, len(attention) + len(hybrid)):.1f}%).",
        "",
    ]
    causes = {}
    for fam, kind in kinds.items():
        if kind in ("refused", "partly", "refused-no-kv-cache", "refused-hybrid", "error", "build"):
            per = results[fam][worlds[0]]
            messages = [per[0].get("message", "")] + [c.get("message", "") for c in per[0].get("cells", {}).values()]
            causes.setdefault(_cause(" ".join(m for m in messages if m)), []).append(fam)
    lines += ["## What is not exact, by cause", "", "| cause | families |", "|---|---|"]
    lines += [f"| {c} | {', '.join(sorted(f))} |" for c, f in sorted(causes.items(), key=lambda x: -len(x[1]))]
    lines.append("")
    for world in worlds:
        keys = sorted({k for per in results.values() for r in per.get(world, [{}])[:1] for k in r.get("cells", {})}
                      - {"probe"})
        low = list(LOW_DTYPES)  # a column each, "not run" where the family has no result in it
        lines += [f"## {world} ranks", "", "| model type | class (attention) | fp32 | " + "".join(
            f"{d} | " for d in low) + " | ".join(keys) + " |", "|---|---|---|" + "---|" * (len(low) + len(keys))]
        for fam in sorted(results):
            per = results[fam].get(world)
            if per is None:
                continue
            r = per[0]
            low_verdicts = [classify(results[fam][d][world]) if world in results[fam].get(d, {}) else "not run"
                            for d in low]
            if r["status"] != "ok" or "probe" in r["cells"]:
                what = f"{r['class']} ({r['attn']})" if "class" in r else ""
                lines.append(f"| {fam} | {what} | {classify(per)} | " + "".join(f"{v} | " for v in low_verdicts)
                             + f"{r['message']} |" + " |" * (len(keys) - 1))
                continue
            row = [fam, f"{r['class']} ({r['attn']})", classify(per), *low_verdicts]
            for k in keys:
                c = cell(per, k)
                if c is None:
                    row.append("")
                elif c["status"] in ("exact", "WRONG"):
                    row.append(f"{c['status']} {c['err']:.1e}, tokens {'=' if c['tokens_equal'] else '≠'}"
                               + ("" if c["same"] else ", ranks differ")
                               + (f"; left whole (replicated): {'; '.join(c['whole'])}" if c.get("whole") else "")
                               + ("; with the attention_mask and position_ids generate passes (the bare call is not "
                                  "traceable: transformers derives them from the static cache's length)"
                                  if c.get("bare") else ""))
                else:
                    row.append(f"{c['status']}: {c['message']}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    for d in LOW_DTYPES:
        lines += render_low(results, worlds, d)
    return "\n".join(lines)


def from_log(path: str, world: int) -> dict:
    """Results recovered from a run's log lines (``family: status: message`` / ``family: key=verdict, ...``), for a
    run cut short: messages are the log's first 120 characters."""
    results = {}
    for line in Path(path).read_text().splitlines():
        fam, sep, rest = line.partition(": ")
        if not sep or " " in fam or fam.startswith("["):
            continue
        if "=" in rest and rest.split("=")[0].startswith("kvp"):
            cells = {k: {"status": "ran-log", "verdict": v} for k, v in (c.split("=") for c in rest.split(", "))}
            results[fam] = {world: [{"status": "ok", "class": "", "attn": "", "cells": cells}]}
        elif rest.startswith(("build:", "refused:", "WRONG:", "crash")):
            status, _, message = rest.partition(": ")
            cells = {} if status == "build" else {"probe": {"status": "error", "message": message}}
            results[fam] = {world: [{"status": "build" if status == "build" else "ok", "message": message,
                                     "cells": cells}]}
    return results


def tested_first(families) -> list:
    """``families`` with the model types of tests/models.py's FAMILIES first (in its order), then the rest."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from models import FAMILIES

    tested = [t for t in dict.fromkeys(t for t, _ in FAMILIES.values()) if t in families]
    return tested + [f for f in families if f not in tested]


def run_some(families, worlds, steps, dtype, results, log):
    """Probe, then run on ranks, ``families`` in ``dtype``, into ``results`` (their earlier ``dtype`` results
    replaced)."""
    import signal

    def _timeout(*_):
        raise TimeoutError("the single-rank probe took over 180 s (the family is too large or hangs)")

    def put(fam, world, per):
        (results[fam] if dtype == "float32" else results[fam][dtype])[world] = per

    for fam in families:  # fp32 replaces a family's world keys and keeps its lower precisions; those replace theirs
        if dtype == "float32":
            results[fam] = {d: v for d, v in results.get(fam, {}).items() if d in LOW_DTYPES}
        else:
            results.setdefault(fam, {})[dtype] = {}
    name = (lambda f: f) if dtype == "float32" else (lambda f: f"{f}@{dtype}")  # see split_dtype
    probed = {}
    signal.signal(signal.SIGALRM, _timeout)
    for fam in families:  # layout-independent refusals and build failures, without spawning ranks
        signal.alarm(180)
        try:
            probed[fam] = probe(name(fam))
        except TimeoutError as e:
            probed[fam] = {"status": "build", "message": str(e)}
        signal.alarm(0)
        if probed[fam]["status"] != "ok":
            log(f"{name(fam)}: {probed[fam]['status']}: {probed[fam]['message'][:120]}")
            cells = {} if probed[fam]["status"] == "build" else {"probe": {**probed[fam], "status": "error"}}
            for w in worlds:
                put(fam, w, [{**probed[fam], "status": "build" if not cells else "ok", "cells": cells}])
    families = [f for f in families if probed[f]["status"] == "ok"]
    for world in worlds:
        if not families:
            break
        mine = (lambda f: results[f]) if dtype == "float32" else (lambda f: results[f][dtype])
        todo = families if world == worlds[0] else [
            f for f in families if worlds[0] in mine(f) and classify(mine(f)[worlds[0]]) in GOOD]
        for fam, per in run_world([name(f) for f in todo], world, steps, log=log).items():
            for r in per:
                for c in r.get("cells", {}).values():
                    c.pop("trace", None) if c.get("status") != "error" else None
            put(split_dtype(fam)[0], world, per)


def main():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, action="append", help="ranks (repeatable; default 2)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--only", help="comma-separated model types")
    p.add_argument("--dtype", default="float32", choices=("float32", *LOW_DTYPES),
                   help="the precision to run in (default float32); a lower one is judged against one device's own "
                        "error in it and kept beside the fp32 results")
    p.add_argument("--tested-first", action="store_true",
                   help="run the model types of tests/models.py first, then the rest")
    p.add_argument("--stop-after", type=float, metavar="MINUTES",
                   help="start no family after MINUTES (the families run in groups of --group); the rest keep their "
                        "earlier results, or none")
    p.add_argument("--group", type=int, default=4, help="families per group of ranks with --stop-after (default 4)")
    p.add_argument("--out", default="docs/coverage.md")
    p.add_argument("--json", help="also write the raw results here (default: --out with .json)")
    p.add_argument("--merge", action="append", default=[],
                   help="results of an earlier run (its --json; repeatable): re-run only --only, keep the rest")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite --out from the results file (--json, default: --out with .json)")
    args = p.parse_args()
    out, raw = Path(args.out), Path(args.json or str(Path(args.out).with_suffix(".json")))

    if args.render:
        results, runs = load(raw.read_text())
        out.write_text(render(results, worlds_of(results), runs[-1]["steps"] if runs else args.steps, runs) + "\n")
        print(f"wrote {args.out} from {raw}")
        return
    worlds = args.world or [2]
    families = [f for f in args.only.split(",") if f] if args.only is not None else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.tested_first:
        families = tested_first(families)
    start = time.time()
    results, runs = {}, []
    for earlier in args.merge:
        if earlier.endswith(".log"):
            results.update(from_log(earlier, worlds[0]))
            continue
        loaded, earlier_runs = load(Path(earlier).read_text())
        runs += earlier_runs
        results.update(loaded)
    groups = [families[i:i + args.group] for i in range(0, len(families), args.group)] if args.stop_after else [
        families]
    done = []
    first = run_record(sys.argv[1:], [], args.steps, 0, args.dtype)  # the commit before this run writes its outputs
    for group in groups:
        if args.stop_after and time.time() - start > 60 * args.stop_after:
            print(f"--stop-after {args.stop_after:g}: {len(families) - len(done)} model types not started", flush=True)
            break
        run_some(group, worlds, args.steps, args.dtype, results, log=lambda s: print(s, flush=True))
        done += group
        ran = "all" if args.only is None and len(done) == len(families) else sorted(done)
        record = {**first, "minutes": round((time.time() - start) / 60), "families": ran}
        raw.parent.mkdir(parents=True, exist_ok=True)  # the results first: an hour of runs is never lost to a path
        raw.write_text(dump(results, runs + [record]))  # after each group: a run cut short keeps what it ran
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(results, worlds_of(results), args.steps, runs + [record]) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
