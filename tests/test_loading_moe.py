"""from_pretrained of MoE checkpoints: transformers 5.x saves one tensor per expert (Mixtral's w1/w3/w2, Qwen2-MoE's
and DeepSeek's gate/up/down_proj); each rank reads only its experts (ep) and their tpf slice into its fused piece,
the same piece the plan asks for (the runtime refuses a registered shard that differs), and the result is exact."""

import pytest
import torch

import helix_compile
from helix_compile import Layout, StaticCache, shards
from distributed import run_ranks
from models import ATTENTION, model, prompt
from test_memory import _compare_sharded

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load_and_compare(rank, folders, layouts):
    from transformers import AutoModelForCausalLM

    out = []
    for (family, folder), fields in zip(folders.items(), layouts):
        torch._dynamo.reset()
        layout = Layout(kv_block=4, **fields)
        sharded = helix_compile.from_pretrained(folder, layout)
        experts = [p for n, p in sharded.named_parameters() if ".experts." in n]
        held = sum(shards.lookup(p, k).numel() for p in experts for k in shards.keys_of(p)) / sum(p.numel() for p in experts)
        reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=ATTENTION.get(family, "sdpa")).eval()
        out.append((family, _compare_sharded(sharded, reference, layout), held))
    return out


def test_per_expert_checkpoints_load_per_rank(tmp_path):
    folders = {}
    for family in ("mixtral", "deepseek_v3", "aria_text"):  # Aria: saved as experts.fc1/fc2, stored (E, in, out)
        folders[family] = str(tmp_path / family)
        model(family).save_pretrained(folders[family])
    layouts = [dict(kvp=1, tpa=2, ep=2), dict(kvp=2, ep=1), dict(kvp=2, ep=1)]  # 2 whole experts per rank; every
    # expert split in two
    for per_rank in run_ranks(2, _load_and_compare, folders, layouts):
        for family, err, held in per_rank:
            print(f"{family}: from_pretrained shards max rel err {err:.2e}, holds {held:.0%} of the expert weights")
            assert err < 1e-5, family
            assert held == 0.5, family  # 1/N of every expert tensor, never loaded whole


def test_interleaved_fused_experts_load_per_rank(tmp_path):
    """gpt-oss: fused experts stored (E, in, out) with gate and up features interleaved [g0 u0 g1 u1 ...]
    (transformers' is_concatenated=False): split over tpf = 2 each rank reads the (gate, up) pairs of its
    features, as the plan cuts them, and over ep = 2 whole experts; exact either way."""
    folders = {"gpt_oss": str(tmp_path / "gpt_oss")}
    model("gpt_oss").save_pretrained(folders["gpt_oss"])
    for layouts in ([dict(kvp=2, ep=1)], [dict(kvp=1, tpa=2, ep=2)]):
        for ((family, err, held),) in run_ranks(2, _load_and_compare, folders, layouts):
            print(f"{family} {layouts[0]}: from_pretrained shards max rel err {err:.2e}, holds {held:.0%}")
            assert err < 1e-5 and held < 0.6  # the down bias is whole on every tpf rank; the rest is split


def _low_precision(rank, cases):
    """Per case: max |logits - fp32 reference| / max |fp32| of helix (the checkpoint loaded per rank in ``dtype``)
    and of single-device transformers in ``dtype``, both fed the fp32 model's greedy tokens."""
    from transformers import AutoModelForCausalLM
    from transformers import StaticCache as HFStaticCache

    out = []
    for folder, dtype, experts, executor, fields in cases:
        torch._dynamo.reset()
        layout = Layout(kv_block=4, **fields)
        sharded = helix_compile.from_pretrained(folder, layout, dtype=dtype, experts_implementation=experts)
        low = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=experts).eval()
        fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation=experts).eval()
        compiled = torch.compile(sharded, backend="helix", options={"layout": layout, "executor": executor}, fullgraph=True)
        cache = StaticCache(sharded.config, 2, 16, layout, dtype=dtype)
        low_cache, fp32_cache = HFStaticCache(low.config, max_cache_len=16), HFStaticCache(fp32.config, max_cache_len=16)
        ids, helix_err, single_err, scale = prompt(), 0.0, 0.0, 0.0
        with torch.no_grad():
            for _ in range(3):  # prefill and two decode steps
                got = compiled(input_ids=ids, past_key_values=cache).logits[:, -1].float()
                single = low(input_ids=ids, past_key_values=low_cache).logits[:, -1].float()
                ref = fp32(input_ids=ids, past_key_values=fp32_cache).logits[:, -1]
                helix_err = max(helix_err, (got - ref).abs().max().item())
                single_err = max(single_err, (single - ref).abs().max().item())
                scale = max(scale, ref.abs().max().item())
                ids = ref.argmax(-1, keepdim=True)
        out.append((helix_err / scale, single_err / scale))
    return out


def test_low_precision_moe_checkpoints_per_rank(tmp_path):
    """bf16 / fp16 MoE checkpoints loaded per rank (virtual global expert weights, stride 0, over rank-local
    shards) through both of transformers' experts implementations: bf16 grouped_mm runs torch._grouped_mm, whose
    stride check must never see a virtual weight. Judged as the GPU smoke judges low precision: helix's error
    against the fp32 model within that of single-device transformers in the same dtype."""
    cases = [("mixtral", torch.bfloat16, "grouped_mm", "inductor", dict(kvp=2, ep=2)),  # 2 whole experts per rank
             ("deepseek_v3", torch.bfloat16, "grouped_mm", "eager", dict(kvp=2, ep=1)),  # every expert split in two
             ("qwen3_moe", torch.bfloat16, "batched_mm", "eager", dict(kvp=1, tpa=2, ep=2)),
             ("olmoe", torch.float16, "grouped_mm", "eager", dict(kvp=2, ep=1))]  # fp16: transformers' fallback op
    folders = {}
    for family, *_ in cases:
        folders[family] = str(tmp_path / family)
        model(family).save_pretrained(folders[family])
    runs = [(folders[family], *rest) for family, *rest in cases]
    results = run_ranks(2, _low_precision, runs)
    for rank_results in results[1:]:
        assert rank_results == results[0]
    for (family, dtype, experts, executor, fields), (helix_err, single_err) in zip(cases, results[0]):
        print(f"{family} {dtype} {experts} {executor} {fields}: vs fp32 helix {helix_err:.2e}, single device {single_err:.2e}")
        assert helix_err < 2 * single_err, (family, helix_err, single_err)
