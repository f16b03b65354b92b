"""The prefill path of partial attention on CUDA (``lowering/prefill.py``) against the fp32 reference.

Each case builds a rank's shard with the keys written where ``kv_write_local`` puts them, runs
``helix::partial_attention`` (which takes PyTorch's cuDNN / FlashAttention kernels where it can and the Triton kernel
otherwise) and the Triton kernel itself, and compares both with ``partial_attention_reference`` computed in fp32 on
the same 16-bit inputs: the prefill path's error is at most twice the Triton kernel's own (both round P and o to
16 bits), for the output and the LSE alike, and the cases the path must refuse give the Triton kernel's bits.
"""

from __future__ import annotations

import pytest
import torch

from helix_compile.lowering import prefill
from helix_compile.lowering.ops import partial_attention_reference
from helix_compile.lowering.triton_attention import partial_attention as triton_partial_attention

SCALE = 0.088


def _case(b, hq, hk, d, start, length, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    capacity = start + length + 37  # slots past the prompt hold garbage that no query may see
    q = torch.randn(b, hq, length, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hk, capacity + 1, d, device="cuda", dtype=dtype, generator=g) * 2
    v = torch.randn(b, hk, capacity + 1, d, device="cuda", dtype=dtype, generator=g)
    pos = torch.arange(start, start + length, device="cuda")
    return q, k, v, pos


def _split(packed, d):
    o = packed[..., :d].float()
    lse = packed[..., d:].contiguous().view(torch.float32).squeeze(-1)
    return o, lse


def _errors(packed, want, d):
    (o, lse), (wo, wl) = _split(packed, d), _split(want, d)
    return (o - wo).abs().max().item(), (lse - wl).abs().max().item()


@pytest.mark.parametrize("b,hq,hk,d,start,length,dtype", [
    (1, 8, 1, 128, 0, 1000, torch.bfloat16),      # MQA, a prompt into an empty cache
    (2, 8, 2, 128, 0, 513, torch.bfloat16),       # GQA, batch 2
    (1, 4, 4, 64, 0, 300, torch.float16),         # MHA, fp16, head dim 64
    (1, 8, 2, 128, 700, 300, torch.bfloat16),     # a second chunk of a prompt: keys written by an earlier call
    (1, 4, 2, 256, 0, 257, torch.bfloat16),       # head dim 256: FlashAttention-2
])
def test_prefill_path_within_the_triton_kernels_error(b, hq, hk, d, start, length, dtype):
    q, k, v, pos = _case(b, hq, hk, d, start, length, dtype)
    assert prefill.eligible(q, k, v, 1, 0.0, 0, None, None, None, 0)
    mask = torch.ones(b, start + length + 5, dtype=torch.int64, device="cuda")  # what generate passes
    want = partial_attention_reference(q.float(), k.float(), v.float(), pos, 0, 1, 16, SCALE, key_mask=mask)
    ours = torch.ops.helix.partial_attention(q, k, v, pos, 0, 1, 16, SCALE, key_mask=mask)
    triton = triton_partial_attention(q, k, v, pos, 0, 1, 16, SCALE, key_mask=mask)
    o_err, lse_err = _errors(ours, want, d)
    t_o_err, t_lse_err = _errors(triton, want, d)
    print(f"prefill path: o {o_err:.2e} lse {lse_err:.2e}; triton: o {t_o_err:.2e} lse {t_lse_err:.2e}")
    assert o_err <= 2 * t_o_err + 1e-6 and lse_err <= 2 * t_lse_err + 1e-6


@pytest.mark.parametrize("what", ["padded", "gaps", "kvp2", "fp32"])
def test_calls_the_path_cannot_take_run_the_triton_kernel(what):
    b, hq, hk, d, length = 2, 4, 2, 64, 200
    dtype = torch.float32 if what == "fp32" else torch.bfloat16
    q, k, v, pos = _case(b, hq, hk, d, 0, length, dtype, seed=1)
    mask, kvp = None, 1
    if what == "padded":
        mask = torch.ones(b, length, dtype=torch.int64, device="cuda")
        mask[1, :17] = 0
    if what == "gaps":
        pos = pos * 2
    if what == "kvp2":
        kvp = 2
    block = 16 if kvp > 1 else 1  # with one KVP rank every kv_block places position p in slot p
    ours = torch.ops.helix.partial_attention(q, k, v, pos, 0, kvp, block, SCALE, key_mask=mask)
    triton = triton_partial_attention(q, k, v, pos, 0, kvp, block, SCALE, key_mask=mask)
    assert torch.equal(_bits(ours), _bits(triton))  # bitwise: the packed LSE's halves may read as NaN


def _bits(packed):
    return packed.view(torch.int16) if packed.dtype.itemsize == 2 else packed.view(torch.int32)


@pytest.mark.parametrize("start", [0, 300])
def test_fp8_shards_run_the_triton_kernel(start):
    """An FP8 cache's prefill runs the Triton kernel (it folds each head's scale into its fp32 math)."""
    b, hq, hk, d, length = 1, 8, 2, 128, 700
    q, k, v, pos = _case(b, hq, hk, d, start, length, torch.bfloat16, seed=2)
    k_scale = torch.tensor([0.02, 0.05], device="cuda")
    v_scale = torch.tensor([0.01, 0.03], device="cuda")
    k8 = (k.float() / k_scale[None, :, None, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    v8 = (v.float() / v_scale[None, :, None, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert not prefill.eligible(q, k8, v8, 1, 0.0, 0, None, None, None, 0)
    ours = torch.ops.helix.partial_attention(q, k8, v8, pos, 0, 1, 16, SCALE, k_scale=k_scale, v_scale=v_scale)
    triton = triton_partial_attention(q, k8, v8, pos, 0, 1, 16, SCALE, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(_bits(ours), _bits(triton))
