"""GPU check (not a CI test): the compiled Triton kernel with ALiBi against the reference op, and under Inductor."""
import torch
from helix_compile.lowering import ops
from helix_compile.lowering.triton_attention import partial_attention as tpa

torch.manual_seed(0)
dev = "cuda"
worst = {}
for dtype in (torch.float32, torch.bfloat16):
    for (b, hq, hk, length, d, cap, kvp, rank, block) in [(2, 8, 2, 1, 64, 4000, 2, 1, 16), (1, 32, 1, 1, 128, 70000, 4, 3, 32),
                                                         (2, 8, 8, 37, 64, 300, 2, 0, 16)]:
        q = torch.randn(b, hq, length, d, device=dev).to(dtype)
        k = torch.randn(b, hk, cap + 1, d, device=dev).to(dtype)
        v = torch.randn(b, hk, cap + 1, d, device=dev).to(dtype)
        first = cap * kvp - length - 5
        pos = torch.arange(length, device=dev) + first
        slopes = 2.0 ** -torch.arange(1, hq + 1, device=dev, dtype=torch.float32)
        mask = torch.ones(b, first + length, dtype=torch.long, device=dev)
        mask[0, :7] = 0
        mask[-1, 100:130] = 0
        apos = (mask.cumsum(-1) - 1) * mask
        for km, ap in ((None, None), (mask, apos)):
            want = ops.partial_attention_reference(q, k, v, pos, rank, kvp, block, 0.125, 0.0, 0, km, slopes, ap)
            got = tpa(q, k, v, pos, rank, kvp, block, 0.125, 0.0, 0, km, alibi_slopes=slopes, alibi_pos=ap)
            got2 = torch.ops.helix.partial_attention(q, k, v, pos, rank, kvp, block, 0.125, key_mask=km,
                                                     alibi_slopes=slopes, alibi_pos=ap)
            err = (got[..., :d].float() - want[..., :d].float()).abs().max().item()
            lse = (got[..., d:].contiguous().view(torch.float32) - want[..., d:].contiguous().view(torch.float32)).abs()
            lse = lse[torch.isfinite(lse)].max().item()
            assert torch.equal(got, got2)
            print(dtype, (b, hq, hk, length, d, cap, kvp), "mask" if km is not None else "nomask", f"o err {err:.2e} lse err {lse:.2e}")

f = torch.compile(lambda q, k, v, pos, s: torch.ops.helix.partial_attention(q, k, v, pos, 0, 2, 16, 0.125, alibi_slopes=s), backend="inductor")
q = torch.randn(2, 8, 1, 64, device=dev); k = torch.randn(2, 2, 1001, 64, device=dev); v = torch.randn_like(k)
pos = torch.tensor([1500], device=dev); s = 2.0 ** -torch.arange(1, 9, device=dev, dtype=torch.float32)
a = f(q, k, v, pos, s); r = ops.partial_attention_reference(q, k, v, pos, 0, 2, 16, 0.125, 0.0, 0, None, s)
print("inductor", (a[..., :64] - r[..., :64]).abs().max().item())
