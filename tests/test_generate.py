"""The HuggingFace user's path: ``model.generate`` through helix, padded batches, grad mode.

``generate`` runs with ``model.forward = torch.compile(model.forward, backend="helix", ...)`` and a helix
``StaticCache`` on real gloo ranks, against plain single-device ``generate`` (transformers' own cache): tokens
identical (greedy, and sampling with the same seed), raw logits of every step within 1e-5 relative. Prompts of
different lengths are left-padded (``attention_mask``); kv_block=4 so the prompts and the new tokens cross KV
blocks on every KVP rank.
"""

import pytest
import torch

from distributed import run_ranks
from helix_compile import Layout, StaticCache
from models import model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NEW_TOKENS, MAX_LEN, KV_BLOCK, PAD = 10, 20, 4, 0


def padded_prompts(lengths=(7, 4, 1), vocab=97, seed=3):
    """Left-padded prompts of the given lengths: (input_ids, attention_mask); pad positions hold PAD."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def _generate(m, ids, mask, sample, cache=None):
    torch.manual_seed(1234)  # the same sampling stream for helix and the reference, on every rank
    with torch.no_grad():
        out = m.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=sample,
            past_key_values=cache, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD,
        )
    return out.sequences, torch.stack(out.logits, 1)


def _generate_body(rank, cases, executor, paddings):
    import helix_compile.backend as backend
    import helix_compile.lowering.compile as lowering

    compiles, pads = [], []  # Inductor compiles of local programs, key masks padded to max_cache_len, on this rank
    inductor, pad = lowering._inductor, backend._pad_key_mask
    lowering._inductor = lambda *a: compiles.append(1) or inductor(*a)
    backend._pad_key_mask = lambda *a: pads.append(1) or pad(*a)
    results = []
    for family, layouts in cases:
        ref = model(family)
        for kvp, tpa, *ep in layouts:  # (kvp, tpa) or (kvp, tpa, ep)
            torch._dynamo.reset()
            layout = Layout(kvp, tpa, ep=ep[0] if ep else 1, kv_block=KV_BLOCK)
            m = model(family)
            m.forward = torch.compile(m.forward, backend="helix", options={"layout": layout, "executor": executor})
            for padded in paddings:
                ids, mask = padded_prompts() if padded else padded_prompts(lengths=(7, 7, 7))  # one prefill graph
                for sample in (False, True):
                    tokens, logits = _generate(m, ids, mask, sample, StaticCache(m, 3, MAX_LEN, layout))
                    ref_tokens, ref_logits = _generate(ref, ids, mask, sample)
                    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
                    results.append(((family, kvp, tpa, *ep, padded, sample), tokens.tolist(), ref_tokens.tolist(), err,
                                    bool(torch.isfinite(logits).all())))
    return results, len(compiles), len(pads)


def check_generate(world, cases, executor="eager", paddings=(True, False), per_rank=None):
    """``per_rank``: ``_generate_body``'s results of every rank, when the ranks already ran it."""
    per_rank = per_rank or run_ranks(world, _generate_body, cases, executor, paddings)
    _, compiles, pads = per_rank[0]
    per_rank = [results for results, _, _ in per_rank]
    # the growing mask is padded to max_cache_len on the decode steps (one CUDA graph for them all); generate
    # passes no mask to the model when no row is padded
    runs = 2 * sum(paddings) * sum(len(layouts) for _, layouts in cases)
    assert pads >= runs * (NEW_TOKENS - 2), pads
    if executor == "inductor":
        # at most the prefill, a first decode step and one program for all later steps per layout, not one
        # compile per generated token
        assert compiles <= 3 * sum(len(layouts) for _, layouts in cases), compiles
    for i, (case, tokens, ref_tokens, err, finite) in enumerate(per_rank[0]):
        print(f"generate {case} world={world} {executor}: max rel err of the logits {err:.2e}")
        assert finite, case
        assert err < 1e-5, (case, err)
        assert tokens == ref_tokens, (case, tokens, ref_tokens)
        for other in per_rank[1:]:
            assert other[i][1] == tokens, ("ranks disagree", case)


@pytest.mark.tf_low
def test_generate_two_ranks():
    check_generate(2, [("llama", [(2, 1)]), ("qwen2", [(1, 2)])])


def test_generate_four_ranks():
    check_generate(4, [("llama", [(2, 2)]), ("qwen2", [(4, 1)])])


MLA_GENERATE = [("deepseek_v3", [(2, 1, 2)]), ("deepseek_v2", [(2, 1)])]
MLA_ALL_ONES = [dict(family="deepseek_v3", layout=(2, 1), ep=2, lengths=(7, 7, 7))]


def _mla_body(rank):
    return _generate_body(rank, MLA_GENERATE, "eager", (True,)), _forward_body(rank, MLA_ALL_ONES)


def test_generate_mla():
    """Multi-head latent attention (absorbed prefill and decode over the sequence-sharded latent cache) under the
    2-D attention_mask: generate on left-padded prompts, DeepSeek-V3 with its MoE FFN as tpf=1 x ep=2 and
    DeepSeek-V2 (no q LoRA) with tpf=2 (generate passes no mask for unpadded prompts); and forward calls with an
    explicit all-ones mask, prefill and 5 decode steps. One pair of ranks for both."""
    per_rank = run_ranks(2, _mla_body)
    check_generate(2, MLA_GENERATE, paddings=(True,), per_rank=[g for g, _ in per_rank])
    check_forward(2, MLA_ALL_ONES, per_rank=[f for _, f in per_rank])


def test_generate_inductor():
    check_generate(2, [("llama", [(2, 1)])], executor="inductor", paddings=(True,))


def test_generate_batch_sizes_vary():
    """generate with batches of 3 and 2 rows on one compiled forward (Dynamo makes the batch symbolic) and one
    cache size (max_batch_size 4: the smaller batches use its first rows)."""
    ref, m = model("llama"), model("llama")
    layout = Layout(1, kv_block=KV_BLOCK)
    torch._dynamo.reset()
    m.forward = torch.compile(m.forward, backend="helix", options={"layout": layout, "executor": "eager"})
    for lengths in ((7, 4, 1), (3, 7)):
        ids, mask = padded_prompts(lengths)
        tokens, logits = _generate(m, ids, mask, False, StaticCache(m, 4, MAX_LEN, layout))
        ref_tokens, ref_logits = _generate(ref, ids, mask, False)
        assert torch.equal(tokens, ref_tokens), lengths
        assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5


def test_padding_changes_the_answer():
    """The padded prompts above test something: without the mask, the reference's first tokens differ."""
    ref = model("llama")
    ids, mask = padded_prompts()
    with torch.no_grad():
        masked = ref(input_ids=ids, attention_mask=mask).logits[:, -1]
        unmasked = ref(input_ids=ids).logits[:, -1]
    assert (masked - unmasked).abs().max() > 1e-2


# -- padded forward calls: prefill and decode with an explicit attention_mask ------------------------------------
def _forward_body(rank, cases):
    from transformers import StaticCache as HFStaticCache

    reports = []
    for case in cases:
        torch._dynamo.reset()
        m = model(case["family"], attn=case.get("attn", "sdpa"))
        layout = Layout(*case["layout"], ep=case.get("ep", 1), kv_block=KV_BLOCK, hopb_chunks=case.get("hopb", 1))
        options = {"layout": layout, "executor": "eager"}
        compiled = torch.compile(m, backend="helix", options=options, fullgraph=True)
        ids, mask = padded_prompts(case.get("lengths", (7, 4, 1)))
        cache = StaticCache(m, case.get("max_batch", len(ids)), MAX_LEN, layout)
        ref_cache = HFStaticCache(m.config, max_cache_len=MAX_LEN)
        keep = mask.bool()  # a pad query row attends to no key: compare real positions only
        worst, finite = 0.0, True
        with torch.no_grad():
            for step in range(6):
                out = compiled(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
                ref = m(input_ids=ids, attention_mask=mask, past_key_values=ref_cache).logits
                finite &= bool(torch.isfinite(out).all())  # pad rows included: nothing may be NaN
                diff, scale = (out - ref).abs()[keep], ref.abs()[keep].max()
                worst = max(worst, (diff.max() / scale).item())
                ids = ref[:, -1:].argmax(-1)
                assert torch.equal(out[:, -1].argmax(-1), ids[:, 0]), (case, step)
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
                keep = torch.ones_like(ids, dtype=torch.bool)
        reports.append((worst, finite))
    return reports


def check_forward(world, cases, per_rank=None):
    per_rank = per_rank or run_ranks(world, _forward_body, cases)
    for case, (worst, finite) in zip(cases, per_rank[0]):
        print(f"padded forward {case}: max rel err {worst:.2e}")
        assert finite and worst < 1e-5, (case, worst, finite)


@pytest.mark.tf_low
def test_padded_forward():
    """Prefill + 5 decode steps with an explicit attention_mask. Batch 3 in a cache of max_batch_size 4 (the rows
    beyond the batch unused); the eager attention form; HOP-B, which slices the key mask per batch chunk."""
    check_forward(2, [
        dict(family="llama", layout=(2, 1), max_batch=4),
        dict(family="qwen2", layout=(1, 2), attn="eager"),
        dict(family="llama", layout=(2, 1), hopb=2, lengths=(7, 2, 5, 1)),
    ])


# -- grad mode --------------------------------------------------------------------------------------------------
def test_grad_mode_runs_and_backward_refuses():
    """The README snippet without torch.no_grad(), on a model from from_config (its parameters require grad)."""
    m = model("llama")
    assert all(p.requires_grad for p in m.parameters())
    ids, mask = padded_prompts()
    layout = Layout(1, kv_block=KV_BLOCK)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="helix", options={"layout": layout, "executor": "eager"})
    cache = StaticCache(m, 3, MAX_LEN, layout)
    logits = compiled(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
    with torch.no_grad():
        expected = m(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert ((logits - expected).abs()[keep].max() / expected.abs()[keep].max()).item() < 1e-5
    assert logits.requires_grad
    with pytest.raises(RuntimeError, match="helix is inference-only"):
        logits.sum().backward()
    step = compiled(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache)
    assert step.logits.shape == (3, 1, 97) and cache.host_length == 8
