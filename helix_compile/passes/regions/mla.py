"""Region matcher: DeepSeek-V2/V3 multi-head latent attention (MLA) over a sequence-sharded latent cache.

Match (pattern): a helix cache write whose cached ``keys`` feed a projection (``kv_b_proj``) instead of the
attention: transformers 5.x caches the compressed latent of MLA, one KV "head": ``keys`` = the normalised
compressed kv (B, 1, S, kv_lora_rank), ``values`` = the rotary key (B, 1, S, qk_rope_head_dim), and
up-projects the *whole* cache every step (``expand_kv``). The layout has tpa = 1 and kvp = N
(``Layout.validate``): each rank holds 1/N of the latent cache along the sequence and, after the all-to-all,
H/N query heads. The q / kv projections stay whole (replicated): with tpa = 1 every rank needs all heads.
    refuses (``UnsupportedModelError`` naming the node): an up-projection whose result is used by anything but
         the attention, a key assembly other than [k_nope, k_rot], eager (matmul-softmax) MLA attention.

Pseudo-code of the rewrite (pattern ... into ...): the absorbed form of MLA (DeepSeek-V2 paper, section 2.1.2),
attention over the latent cache itself, one KV head, as the Helix paper runs MLA decode:
    kv = kv_b_proj(keys)                          # (B, 1, S, H*(dn+dv)), S = the whole global cache, every step
    k_nope, v = split(kv.view(B, S, H, dn+dv).transpose(1, 2), [dn, dv])
    k = [k_nope, values.expand(H)];  o = sdpa(q, k, v, mask, scale)
into
    W_UK, W_UV = kv_b_proj.weight.view(H, dn+dv, r).split([dn, dv], 1)     # (H, dn, r), (H, dv, r)
    q_abs = cat([einsum("bhld,hdr->bhlr", q[..., :dn], W_UK), q[..., dn:]], -1)   # (B, H, L, r + dr)
    # keys cat([latent, rotary key]) of this rank's shard, one KV head, read in place (k_rope); values the latent
    packed = partial_attention(q_abs, latent, latent, pos, kvp_rank, kvp, kv_block, scale, k_rope=rot
                               [, key_mask=])                                                 # (H, B, L, r + e)
    packed = cat([einsum("hblr,hvr->hblv", packed[..., :r], W_UV), packed[..., r:]], -1)   # (H, B, L, dv + e)
    o = lse_merge(wait(all_to_all_single(packed, kvp group)), kvp, dv)       # (B, H/N, L, dv): this rank's heads
Exact by associativity: q_nope . (W_UK c) = (q_nope W_UK) . c for every cached latent c, and
sum_s p_s (W_UV c_s) = W_UV (sum_s p_s c_s); the scale and the softmax are unchanged. W_UV is applied to each
rank's partial output before the exchange (the LSE merge is a weighted sum, which W_UV commutes with), so the
all-to-all carries dv values per head, not r. Each step reads the local latent shard (r + dr values per slot)
instead of up-projecting it to H (dn + dv) values per slot, where it is cached: the kernel takes the key's two
parts separately (``k_rope``) and reads the latent once for keys and values. The partial attentions and the LSE merge
are the usual exact Helix math. The o_proj columns follow the heads each rank
holds after the all-to-all, with head_dim = v_head_dim. Padded batches (``generate``): HF builds the SDPA mask from the
2-D (B, S_m) attention_mask inside the graph; as for GQA attention (``attention_masks.find_key_mask``), partial attention
applies that 2-D mask itself to each key by its global position (``key_mask``), with the causal mask; HF's 4-D
mask is left unused. Any other user mask (a 4-D one) is refused.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .attention_core import KV_WRITE, SDPA_TARGETS
from .attention_masks import check_causal_mask, find_key_mask
from .attention_projections import first_projection_after
from .attention_rewrite import exchange_and_merge
from .common import LINEAR, UnsupportedModelError, module_path, where
from .projection import Projection, is_projection, projection_of



@dataclasses.dataclass
class MLAMatch:
    module: str  # e.g. "model.layers.0.self_attn"
    kv_write: fx.Node
    keys: fx.Node  # cache placeholders: the compressed kv latent and the rotary key
    values: fx.Node
    pos: fx.Node
    query: fx.Node  # (B, H, L, dn + dr)
    core: fx.Node  # the SDPA node
    o: Projection
    kv_b_weight: fx.Node  # placeholder (H*(dn+dv), kv_lora_rank)
    expand: list[fx.Node]  # HF's up-projection of the whole cache (removed by the rewrite)
    heads: int
    nope: int  # dn
    rope: int  # dr
    v_dim: int  # dv
    rank: int  # r = kv_lora_rank, the latent width
    scale: float
    replicated: list  # the q / kv projections of the module (whole on every rank: tpa = 1)
    key_mask: fx.Node | None = None  # the 2-D (B, S_m) attention_mask placeholder HF's mask is built from

    kind = "mla"

    def describe(self) -> str:
        return (f"mla {self.module} heads={self.heads} nope={self.nope} rope={self.rope} v={self.v_dim} r={self.rank} "
                f"kv_b={self.kv_b_weight.name} write={self.kv_write.name} core={self.core.name} o={self.o.name} "
                f"scale={self.scale:g} replicated={[p.name for p in self.replicated]}")

    def projections(self) -> set:
        return {self.o.node} | {p.node for p in self.replicated}

    def placements_nodes(self):
        """The placeholders this region places or replicates on purpose (q / kv projections, tpa = 1)."""
        projs = [self.o, *self.replicated]
        return [(n, None, None) for p in projs for n in (p.weight, p.bias) if isinstance(n, fx.Node)] + [
            (self.keys, None, None), (self.values, None, None)]

    def placements(self, heads):
        if heads.d != self.v_dim or heads.q != self.heads:
            raise ValueError(f"{self.module}: {self.heads} heads of v_head_dim {self.v_dim}, but the config says {heads}")
        return [*self.o.placements("o"), (self.keys, "kv", "cache"), (self.values, "kv", "cache")]

    def replace_with(self, graph: fx.Graph, env: dict, ctx) -> None:
        layout = ctx.layout
        keys, values, k, v, pos = (env[x.name] for x in self.kv_write.args)
        if ctx.kv_fp8:  # StaticCache refuses it first; this guards other callers of the pass
            raise UnsupportedModelError(f"{self.module}: MLA's latent cache has no FP8 form in helix")
        write, core, query = env[self.kv_write.name], env[self.core.name], env[self.query.name]
        with graph.inserting_before(write):
            graph.call_function(
                torch.ops.helix.kv_write_local.default, (keys, values, k, v, pos, ctx.kvp_rank, layout.kvp, layout.kv_block)
            )
        graph.erase_node(write)
        with graph.inserting_before(core):
            key_mask = env[self.key_mask.name] if self.key_mask is not None else None
            merged = absorbed_attention(graph, self, query, keys, values, env[self.kv_b_weight.name], pos, ctx, key_mask)
        core.replace_all_uses_with(merged)
        graph.erase_node(core)
        erase_expand(graph, self, env)
        self.o.row_parallel(graph, env, ctx.world_group, layout.world_size, ctx.split[ctx.kvp_rank] * self.v_dim)


def match_mla(graph: fx.Graph) -> list[MLAMatch]:
    """One ``MLAMatch`` per helix cache write whose latent keys are up-projected, in graph order."""
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in KV_WRITE]
    return [match(w, module_path(w)) for w in writes if is_mla(w.args[0], w)]


def is_mla(keys: fx.Node, write: fx.Node) -> bool:
    """MLA when the cached keys are read by a linear (the latent up-projection) rather than by attention."""
    return any(u.op == "call_function" and u.target is LINEAR for u in keys.users if u is not write)


def match(write: fx.Node, module: str) -> MLAMatch:
    keys, values, _, _, pos = write.args
    readers = [u for u in keys.users if u is not write]
    if len(readers) != 1 or readers[0].target is not LINEAR or readers[0].args[0] is not keys:
        raise UnsupportedModelError(f"{module}: the latent cache must be read once, by kv_b_proj; readers {[u.name for u in readers]}")
    kv_b = readers[0]
    if len(kv_b.args) > 2 and kv_b.args[2] is not None:
        raise UnsupportedModelError(f"{module}: kv_b_proj with a bias is not supported yet: {where(kv_b)}")
    # Everything computed from the cache up to the attention: HF's expand_kv (view, split, expand, new_empty, copy_).
    expand, frontier, cores = [], [keys, values], []
    seen = {write}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in SDPA_TARGETS:
                cores.append(user)
                continue
            expand.append(user)
            frontier.append(user)
    cores = list(dict.fromkeys(cores))
    if len(cores) != 1:
        raise UnsupportedModelError(
            f"{module}: expected the up-projected latent cache to feed one SDPA node, found {[c.name for c in cores]} "
            f"(eager MLA attention is not supported yet: use attn_implementation='sdpa')"
        )
    core = cores[0]
    for node in expand:
        if node.op in ("placeholder", "output") or not module_path(node).startswith(module):
            raise UnsupportedModelError(f"{module}: the up-projected cache is used outside the attention: {where(node)}")
    query = core.args[0]
    key, value = core.args[1], core.args[2]
    if key not in expand or value not in expand or query in expand:
        raise UnsupportedModelError(f"{module}: SDPA {where(core)} does not read the up-projected latent cache")
    if core.kwargs.get("dropout_p", 0.0) not in (0.0, 0) or core.kwargs.get("enable_gqa", False):
        raise UnsupportedModelError(f"{module}: unsupported SDPA arguments {where(core)}")
    check_causal_mask(core.kwargs.get("attn_mask", core.args[3] if len(core.args) > 3 else None), core)
    key_mask = find_key_mask("sdpa", core)  # padded batches: partial attention masks keys by global position
    q_shape, v_shape = _shape(query), _shape(value)
    rope = _shape(values)[-1]
    heads, nope, v_dim = q_shape[1], q_shape[-1] - rope, v_shape[-1]
    w_shape = _shape(kv_b.args[1])
    if kv_b.args[1].op != "placeholder" or w_shape != (heads * (nope + v_dim), _shape(keys)[-1]):
        raise UnsupportedModelError(
            f"{module}: kv_b_proj weight {w_shape} is not ({heads}*({nope}+{v_dim}), kv_lora_rank) for {heads} heads"
        )
    _check_key_assembly(module, expand, key, nope, where)
    scale = core.kwargs.get("scale")
    if scale is None:
        scale = q_shape[-1] ** -0.5
    o = first_projection_after(core, f"attention output of {module}")
    replicated = [projection_of(n) for n in write.graph.nodes
                  if is_projection(n) and n is not o.node and module_path(n).startswith(module + ".")]
    return MLAMatch(module, write, keys, values, pos, query, core, o, kv_b.args[1], expand, heads, nope, rope,
                    v_dim, _shape(keys)[-1], float(scale), replicated, key_mask)


def _check_key_assembly(module, expand, key, nope, where):
    """The key is [k_nope, k_rot] along the last dim: HF's new_empty + copy_ into [..., :dn] and [..., dn:]."""
    copies = [n for n in expand if n.op == "call_method" and n.target == "copy_"]
    slices = sorted(
        (str(c.args[0].args[1]) for c in copies if c.args[0].op == "call_function" and c.args[0].target is operator.getitem
         and c.args[0].args[0] is key)
    )
    want = sorted([str((Ellipsis, slice(None, nope, None))), str((Ellipsis, slice(nope, None, None)))])
    if key.op != "call_method" or key.target != "new_empty" or slices != want:
        raise UnsupportedModelError(
            f"{module}: the key is not assembled as [k_nope ({nope}), k_rot] from the latent cache: {where(key)}"
        )


def _shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


# -- partition -------------------------------------------------------------------------------------------------------
def absorbed_attention(graph: fx.Graph, region: MLAMatch, query, keys, values, weight, pos, ctx,
                       key_mask=None) -> fx.Node:
    """Insert the absorbed MLA attention over this rank's latent shard (module docstring); return this rank's heads
    of the attention output, (B, H_local, L, dv). ``key_mask``: the 2-D attention_mask (padded batches), applied by
    partial attention to keys by global position."""
    layout, nope, r = ctx.layout, region.nope, region.rank
    w = graph.call_method("view", (weight, region.heads, nope + region.v_dim, r))
    w_uk = graph.call_function(operator.getitem, (w, (slice(None), slice(None, nope))))
    w_uv = graph.call_function(operator.getitem, (w, (slice(None), slice(nope, None))))
    q_nope = graph.call_function(operator.getitem, (query, (Ellipsis, slice(None, nope))))
    q_rot = graph.call_function(operator.getitem, (query, (Ellipsis, slice(nope, None))))
    q_lat = graph.call_function(torch.einsum, ("bhld,hdr->bhlr", q_nope, w_uk))
    q_abs = graph.call_function(torch.cat, ([q_lat, q_rot],), {"dim": -1})
    kwargs = {"k_rope": values}
    if key_mask is not None:
        kwargs["key_mask"] = key_mask
    packed = graph.call_function(  # keys [latent | rotary key] read in place (k_rope): no per-step concatenation
        torch.ops.helix.partial_attention.default,
        (q_abs, keys, keys, pos, ctx.kvp_rank, layout.kvp, layout.kv_block, region.scale), kwargs,
    )
    o_part = graph.call_function(operator.getitem, (packed, (Ellipsis, slice(None, r))))
    lse = graph.call_function(operator.getitem, (packed, (Ellipsis, slice(r, None))))
    o_v = graph.call_function(torch.einsum, ("hblr,hvr->hblv", o_part, w_uv))
    packed_v = graph.call_function(torch.cat, ([o_v, lse],), {"dim": -1})
    return exchange_and_merge(graph, packed_v, ctx, region.v_dim)


def erase_expand(graph: fx.Graph, region: MLAMatch, by_name: dict) -> None:
    """Remove HF's up-projection of the whole (global) cache: its in-place copy_ would survive dead-code removal."""
    nodes = [by_name[n.name] for n in region.expand]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
