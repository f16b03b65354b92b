"""Cost of one decode step: Appendix-A roofline per layer, plus collectives, HOP-B overlap and memory per GPU.

Per GPU and layer (all times are per decode step; the batch decodes one token per request):

    attention core  max(KV bytes / MemBW, attention FLOPs / peak)         KV: B*2*ceil(K/tpa)*Hsz*(S/kvp)*bytes
    attention GEMMs max(W_qkv + W_o bytes / MemBW, 2*tokens*params / peak)
    FFN GEMMs       max(W_ffn bytes / MemBW, FLOPs / peak)                 MoE: only the experts the batch hits
    comm            collectives of the strategy; Helix's KVP all-to-all is pipelined with attention by HOP-B
    total           attention core + attention GEMMs + FFN GEMMs + exposed comm + a fitted per-layer fixed cost
                    (hw.per_layer_overhead_us: launches, synchronisation, kernel tails the roofline leaves out)

What is costed (``Costing``): BACKEND, the program our backend emits today (a replicated LM head; MLA
absorbed, the latent and rotary key read where cached; every collective exposed), or PAPER, the target the
paper simulates (absorbed MLA, vocab-parallel LM head, Helix and TP overlapping their all-reduces with GEMMs).
Collective payloads are in the configuration's precision (``dtype``); the LSE stays fp32.

The five strategies differ only in how they split heads, tokens, sequence and experts (see STRATEGIES):
  tp     attention TP over N (KV heads duplicated once N > K; for MLA the whole latent on every GPU, the paper's
         baseline, which the backend does not run), FFN TP over N; 2 all-reduces.
  tp_ep  attention TP over N, MoE FFN as tpf x ep = N.
  dp_ep  data-parallel attention (dp groups of tpa GPUs), experts over ep = N; dispatch + combine all-to-all.
  medha  KVP x TPA attention with an all-reduce combine; FFN TP over the tpa GPUs only (weights replicated kvp-fold).
  helix  KVP x TPA attention, all-to-all combine (HOP-B), W_o TP over N, FFN TP over N or tpf x ep = N.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..layout import Layout
from .collectives import collective_us
from .hardware import ACT_BYTES, DTYPE_BYTES, Hardware
from .model import ModelSpec, attention_params, ffn_params  # noqa: F401  (re-exported)

STRATEGIES = ("helix", "tp", "tp_ep", "dp_ep", "medha")
BASELINES = ("tp", "tp_ep", "dp_ep", "medha")
BACKEND_STRATEGIES = ("helix", "tp")  # what helix_compile runs: Layout(kvp, tpa) with tpa <= K, or kvp=1 tpa=N


@dataclass(frozen=True)
class Costing:
    """Which program is costed.

    mla: 'up-projected' (transformers' code: kv_b_proj over the whole local cache every step) or 'absorbed'
    (attention over the latent, W_UK/W_UV folded in, as the backend runs it; the kernel reads the latent and the
    rotary key where they are cached, with no concatenation).
    lm_head: 'replicated' (every rank computes all logits, as the backend does) or 'vocab-parallel' (+ an
    all-gather of each rank's best token).
    overlap: the all-reduces of Helix and of the TP baselines (tp, tp_ep) hide their bandwidth part under the
    layer's GEMMs (the paper: both "include communication-computation overlap"); the latency of each call stays
    exposed, since a collective cannot finish before it starts. Medha and DP-attention keep theirs exposed (the
    paper: vanilla KVP "exposes all communication overheads").
    lockstep: how Helix without HOP-B exchanges: 'batched' (one all-to-all for the whole batch: alpha once) or
    'per-request' (the lock-step timeline of the paper's Figure 3: one exchange per request, back to back after
    all attention, alpha paid B times)."""
    mla: str = "up-projected"
    lm_head: str = "replicated"
    overlap: bool = False
    lockstep: str = "batched"


BACKEND = Costing(mla="absorbed")
PAPER = Costing(mla="absorbed", lm_head="vocab-parallel", overlap=True)


def backend_runs(m: ModelSpec, strategy: str, tpa: int) -> bool:
    """Whether helix_compile runs this layout: Helix, and the TP baseline except MLA's (latent duplicated tpa-fold,
    the paper's baseline, which ``Layout.validate`` refuses)."""
    return strategy == "helix" or (strategy == "tp" and not (m.is_mla and tpa > 1))


def payload_precision(dtype: str) -> str:
    """The precision of every tensor the collectives move, as the cost model sizes them."""
    b = DTYPE_BYTES[dtype]
    return (f"collective payloads: Helix partial outputs and every all-reduce/all-to-all of activations in {dtype} "
            f"({b:g} B/element); LSE fp32 (4 B per head and request); LM-head all-gather 8 B per request "
            f"(token id + logit)")


@dataclass(frozen=True)
class Candidate:
    """One layout on `gpus` GPUs. gpus = dp*kvp*tpa; the FFN group (gpus, or tpa for medha) = tpf*ep."""
    strategy: str
    gpus: int
    kvp: int
    tpa: int
    tpf: int
    ep: int
    batch: int
    dp: int = 1
    hopb_chunks: int = 0  # 0: pick the best chunk count in 1..batch (hopb_options)
    kv_block: int = 16


def kv_bytes_per_token_head(m: ModelSpec, kv_bytes: float) -> float:
    return (m.kv_lora + m.rope_dim) * kv_bytes if m.is_mla else 2 * m.head_dim * kv_bytes


def _roof(nbytes, flops, hw, dtype):
    return max(nbytes / (hw.mem_bw_gbs * 1e9), flops / hw.flops(dtype))


def _coll(hw: Hardware, op: str, n: int, nbytes: float) -> float:
    return collective_us(hw.collectives[op], op, n, nbytes) * 1e-6


def hopb_exposed(core_s: float, comm_of_bytes, nbytes: float, chunks: int, batch: int | None = None) -> float:
    """Exposed time of the KVP exchange with HOP-B: the batch split into `chunks` chunks of whole requests, chunk i's
    all-to-all running while chunk i+1 attends (the paper's Figure 3 timeline).

    Two-stage pipeline (attention, then exchange), chunks of k = ceil(batch/chunks) requests and a last chunk of
    the rest, so any chunk count works (batch 35 in 35, 6 or 2 chunks). A chunk's exchange costs
    comm(bytes of its requests), latency included; every exchange but the last runs under later attention, so
    both its latency and its bandwidth part hide when it is shorter than a chunk's attention. The last exchange
    is always exposed. batch None: `chunks` equal chunks. Returns the time beyond core_s.
    """
    batch = chunks if batch is None else batch
    chunks = max(1, min(chunks, batch))
    k = -(-batch // chunks)
    n = -(-batch // k) - 1  # full chunks before the last
    last = batch - n * k
    a, m = core_s * k / batch, comm_of_bytes(nbytes * k / batch)
    a_r, m_r = core_s * last / batch, comm_of_bytes(nbytes * last / batch)
    comm_end = (a + m + (n - 1) * max(a, m)) if n else 0.0
    end = max(comm_end, n * a + a_r) + m_r
    return end - core_s


def hopb_options(core_s: float, comm_of_bytes, nbytes: float, batch: int) -> list:
    """Chunk counts worth trying: the exposed time falls with c while one chunk's exchange fits under a chunk's
    attention (c <= (core - bandwidth time) / alpha), then rises as alpha is paid c times (minimum of
    core/c + c*alpha near sqrt(core/alpha)); the integers around both, 1..8, and one chunk per request."""
    alpha = comm_of_bytes(0.0)
    bw_t = comm_of_bytes(nbytes) - alpha
    out = set(range(1, min(batch, 8) + 1)) | {batch}
    if alpha > 0:
        for x in ((core_s - bw_t) / alpha, math.sqrt(core_s / alpha)):
            if x > 0:
                out |= {math.floor(x), math.ceil(x), math.floor(x) + 1}
    return sorted(c for c in out if 1 <= c <= batch)


def _overlapped(total: float, latency: float, gemms: float) -> float:
    """Exposed time of all-reduces whose bandwidth part hides under `gemms` seconds of GEMMs; latency exposed."""
    return latency + max(0.0, total - latency - gemms)


def busiest_experts(local: int, p_hit: float, ep: int) -> float:
    """Expected experts hit on the busiest of `ep` GPUs holding `local` experts each (each hit w.p. p_hit).

    The step waits for the slowest GPU, so EP pays for load imbalance: at batch 1 with top-8 of 256 experts on
    64 GPUs, some GPU reads a whole expert, while TPF = 64 reads 8/64 of one. E[max] = sum_k 1 - P(X < k)^ep.
    """
    if ep == 1 or p_hit >= 1.0:
        return local * p_hit
    pmf = [math.comb(local, k) * p_hit ** k * (1 - p_hit) ** (local - k) for k in range(local + 1)]
    cdf, total = 0.0, 0.0
    for k in range(1, local + 1):
        cdf += pmf[k - 1]
        total += 1.0 - min(cdf, 1.0) ** ep
    return total


@dataclass
class LayerCost:
    kv_read: float
    weight_read: float
    compute: float
    comm: float  # exposed
    comm_raw: float  # sum of the collectives without overlap
    total: float
    hopb_chunks: int = 1


def _shape(m: ModelSpec, c: Candidate):
    """Per-GPU attention shape: requests, query heads, KV heads, W_o heads, FFN group size.

    Helix's W_o heads are the busiest rank's share after the all-to-all, from the backend's own
    ``Layout.head_split`` (uneven when kvp does not divide Q/tpa)."""
    b_att = math.ceil(c.batch / c.dp)
    q_loc = m.q_heads / c.tpa
    k_loc = math.ceil(m.kv_heads / c.tpa)  # tpa > K duplicates KV heads (tp baseline, Layout.kv_heads)
    if c.strategy == "helix":
        o_heads = max(Layout(c.kvp, c.tpa).head_split(m.q_heads // c.tpa))
    else:
        o_heads = q_loc
    ffn_group = c.tpa if c.strategy == "medha" else c.gpus
    return b_att, q_loc, k_loc, o_heads, ffn_group


def layer_cost(m: ModelSpec, hw: Hardware, c: Candidate, S: float, dtype: str, moe: bool,
               costing: Costing = BACKEND, kv_dtype: str | None = None) -> LayerCost:
    """Cost of one layer (attention + FFN) on one GPU for candidate c, in seconds. ``kv_dtype``: the KV cache's
    element type when it differs from ``dtype`` (an FP8 cache: one byte per element), else None."""
    wb, kvb = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype or dtype]
    pb = DTYPE_BYTES[dtype]  # collective payloads travel in the configuration's precision
    H, B = m.hidden, c.batch
    b_att, q_loc, k_loc, o_heads, ffn_group = _shape(m, c)
    tokens = b_att  # tokens through this GPU's attention projections (all B except data-parallel attention)

    # Attention core: read the local KV shard, attend with the local query heads.
    s_loc = S / c.kvp
    kv_read = b_att * k_loc * s_loc * kv_bytes_per_token_head(m, kvb)
    extra_bytes = 0.0
    if m.is_mla and costing.mla == "absorbed":  # MQA over the (kv_lora + rope) latent, then W_UV per head
        att_flops = 2 * b_att * q_loc * s_loc * (2 * m.kv_lora + m.rope_dim) + 2 * b_att * q_loc * m.kv_lora * m.v_dim
    elif m.is_mla:  # transformers: kv_b_proj over every cached position, K/V materialised, then attention
        qk = m.nope_dim + m.rope_dim
        att_flops = (2 * b_att * s_loc * m.kv_lora * q_loc * (m.nope_dim + m.v_dim)
                     + 2 * b_att * q_loc * s_loc * (qk + m.v_dim))
        extra_bytes = 2 * b_att * s_loc * q_loc * (qk + m.v_dim) * kvb  # write K/V, read them back
    else:
        att_flops = 4 * b_att * q_loc * m.head_dim * s_loc
    core = _roof(kv_read + extra_bytes, att_flops, hw, dtype)

    # Attention projections.
    w_att = attention_params(m, q_loc, k_loc, o_heads)
    att_gemm = _roof(w_att * wb, 2 * tokens * w_att, hw, dtype)

    # FFN.
    if not moe:
        split = 1 if c.strategy == "dp_ep" else ffn_group
        w_ffn = 3 * H * m.ffn / split
        ffn_flops = 2 * tokens * w_ffn
    else:
        p_hit = 1.0 - (1.0 - m.top_k / m.experts) ** B  # chance an expert sees >= 1 of the B tokens
        w_exp = busiest_experts(m.experts // c.ep, p_hit, c.ep) * 3 * H * m.expert_ffn / c.tpf
        shared_split = 1 if c.strategy == "dp_ep" else ffn_group
        w_shared = 3 * H * m.shared_ffn / shared_split
        w_router = H * m.experts
        w_ffn = w_exp + w_shared + w_router
        ffn_flops = 2 * (B * m.top_k / c.ep) * 3 * H * m.expert_ffn / c.tpf + 2 * tokens * (w_shared + w_router)
    ffn_gemm = _roof(w_ffn * wb, ffn_flops, hw, dtype)

    # Collectives. The per-head partial output exchanged is v_dim wide for MLA in both forms: W_UV is linear and
    # per head, so it commutes with the LSE merge and is applied before the exchange.
    dv = m.v_dim if m.is_mla else m.head_dim
    partial_bytes = B * q_loc * (dv * pb + 4)  # outputs + fp32 lse
    comm_raw = exposed = 0.0
    chunks = 1
    gemms = att_gemm + ffn_gemm
    if c.strategy == "helix":
        a2a = lambda nb: _coll(hw, "all_to_all", c.kvp, nb)  # noqa: E731
        if c.kvp > 1:
            options = [c.hopb_chunks] if c.hopb_chunks else hopb_options(core, a2a, partial_bytes, B)
            best = min(options, key=lambda k: hopb_exposed(core, a2a, partial_bytes, k, B))
            chunks = min(best, B)
            comm_raw += a2a(partial_bytes)
            if chunks == 1 and costing.lockstep == "per-request":  # Figure 3's lock-step: B exchanges in a row
                exposed += B * a2a(partial_bytes / B)
            else:
                exposed += hopb_exposed(core, a2a, partial_bytes, chunks, B)
        post = 2 * _coll(hw, "all_reduce", c.gpus, B * H * pb)  # after W_o and after the FFN
        comm_raw += post
        exposed += _overlapped(post, 2 * _coll(hw, "all_reduce", c.gpus, 0.0), gemms) if costing.overlap else post
    elif c.strategy in ("tp", "tp_ep"):
        t = 2 * _coll(hw, "all_reduce", c.gpus, B * H * pb)
        comm_raw, exposed = t, t
        if costing.overlap:  # the bandwidth part hides under the GEMMs; the latency cannot
            exposed = _overlapped(t, 2 * _coll(hw, "all_reduce", c.gpus, 0.0), gemms)
    elif c.strategy == "medha":
        t = _coll(hw, "all_reduce", c.kvp, partial_bytes) + 2 * _coll(hw, "all_reduce", c.tpa, B * H * pb)
        comm_raw, exposed = t, t
    elif c.strategy == "dp_ep":
        t = _coll(hw, "all_reduce", c.tpa, b_att * H * pb)
        if moe:  # dispatch and combine of the routed tokens
            t += 2 * _coll(hw, "all_to_all", c.gpus, b_att * m.top_k * H * pb)
        comm_raw, exposed = t, t
    else:
        raise ValueError(f"unknown strategy {c.strategy!r}; known: {', '.join(STRATEGIES)}")

    overhead = hw.per_layer_overhead_us * 1e-6
    total = core + att_gemm + ffn_gemm + exposed + overhead
    flops_t = (att_flops + 2 * tokens * w_att + ffn_flops) / hw.flops(dtype)
    return LayerCost(kv_read=kv_read / (hw.mem_bw_gbs * 1e9), weight_read=(w_att + w_ffn) * wb / (hw.mem_bw_gbs * 1e9),
                     compute=flops_t, comm=exposed, comm_raw=comm_raw, total=total, hopb_chunks=chunks)


def memory_per_gpu(m: ModelSpec, hw: Hardware, c: Candidate, S: float, dtype: str, costing: Costing = BACKEND,
                   kv_dtype: str | None = None) -> dict:
    """Bytes held per GPU (GB): weights, KV cache at capacity S (in ``kv_dtype``, default ``dtype``), activations,
    reserved."""
    wb, kvb = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype or dtype]
    H = m.hidden
    b_att, q_loc, k_loc, o_heads, ffn_group = _shape(m, c)
    att = attention_params(m, q_loc, k_loc, o_heads)
    dense_split = 1 if c.strategy == "dp_ep" else ffn_group
    dense = 3 * H * m.ffn / dense_split
    moe = 0.0
    if m.is_moe:
        moe = m.experts / c.ep * 3 * H * m.expert_ffn / c.tpf + 3 * H * m.shared_ffn / dense_split + H * m.experts
    head_split = 1 if costing.lm_head == "replicated" else ffn_group  # the backend replicates embedding and head
    emb = m.vocab * H * (1 if m.tie_embeddings else 2) / head_split
    weights = (m.layers * att + (m.layers - m.moe_layers) * dense + m.moe_layers * moe + emb) * wb
    cap = math.ceil(S / (c.kv_block * c.kvp)) * c.kv_block  # staggered blocks: the busiest rank's slots
    kv = m.layers * b_att * k_loc * cap * kv_bytes_per_token_head(m, kvb)
    ffn_loc = m.ffn / dense_split if not m.is_moe else max(m.ffn / dense_split, m.top_k * m.expert_ffn)
    act = c.batch * (8 * H + 3 * ffn_loc) * ACT_BYTES + c.batch * m.vocab / head_split * 4
    return {"weights": weights / 1e9, "kv": kv / 1e9, "activations": act / 1e9, "reserved": hw.reserved_gb}


@dataclass
class Evaluation:
    candidate: Candidate
    replicas: int
    per_layer: dict  # seconds, averaged over layers
    head_s: float
    ttl_s: float
    memory: dict
    feasible: bool
    hopb_chunks: int
    backend_runs: bool = True

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1.0 / self.ttl_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.candidate.batch / self.ttl_s / self.candidate.gpus

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values())

    def to_dict(self) -> dict:
        c = asdict(self.candidate)
        c["hopb_chunks"] = self.hopb_chunks
        return {**c, "replicas": self.replicas,
                "per_layer_ms": {k: round(v * 1e3, 6) for k, v in self.per_layer.items()},
                "head_ms": round(self.head_s * 1e3, 6), "ttl_ms": round(self.ttl_s * 1e3, 6),
                "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 4),
                "tokens_per_s_per_user": round(self.tokens_per_s_per_user, 4),
                "memory_gb_per_gpu": round(self.memory_gb, 4),
                "memory_breakdown_gb": {k: round(v, 4) for k, v in self.memory.items()},
                "feasible": self.feasible, "backend_runs": self.backend_runs}


def evaluate(m: ModelSpec, hw: Hardware, c: Candidate, S: float, dtype: str, replicas: int = 1,
             costing: Costing = BACKEND, kv_dtype: str | None = None) -> Evaluation:
    """Time one decode step (TTL) and memory for candidate c (the KV cache in ``kv_dtype``, default ``dtype``)."""
    kinds = [(m.layers - m.moe_layers, False), (m.moe_layers, True)]
    per_layer = {"kv_read": 0.0, "weight_read": 0.0, "compute": 0.0, "comm": 0.0, "total": 0.0}
    layers_s, chunks = 0.0, 1
    for count, moe in kinds:
        if count == 0:
            continue
        lc = layer_cost(m, hw, c, S, dtype, moe, costing, kv_dtype)
        for k in per_layer:
            per_layer[k] += getattr(lc, k) * count / m.layers
        layers_s += lc.total * count
        chunks = max(chunks, lc.hopb_chunks)
    # LM head: replicated (every rank computes all logits: the backend), or vocab-parallel plus the all-gather
    # of each rank's best token.
    _, _, _, _, ffn_group = _shape(m, c)
    split = 1 if costing.lm_head == "replicated" else ffn_group
    w_head = m.vocab * m.hidden / split
    head = _roof(w_head * DTYPE_BYTES[dtype], 2 * c.batch * w_head, hw, dtype)
    head += _coll(hw, "all_gather", split, c.batch * 8)
    mem = memory_per_gpu(m, hw, c, S, dtype, costing, kv_dtype)
    return Evaluation(candidate=c, replicas=replicas, per_layer=per_layer, head_s=head, ttl_s=layers_s + head,
                      memory=mem, feasible=sum(mem.values()) <= hw.memory_gb, hopb_chunks=chunks,
                      backend_runs=backend_runs(m, c.strategy, c.tpa))


def appendix_a(B, Q, K, Hsz, S, F, bytes_per_elem, mem_bw_gbs, tpa=1, tpf=1, kvp=1) -> dict:
    """The paper's Appendix A roofline verbatim (per layer, seconds): t_KV and t_W (SwiGLU)."""
    H = Q * Hsz
    t_kv = B * 2 * math.ceil(K / tpa) * Hsz * (S / kvp) * bytes_per_elem / (mem_bw_gbs * 1e9)
    t_w = (2 * H * (Q / tpa) * Hsz + 2 * H * math.ceil(K / tpa) * Hsz + 3 * H * F / tpf) * bytes_per_elem / (
        mem_bw_gbs * 1e9)
    return {"t_kv": t_kv, "t_w": t_w}
