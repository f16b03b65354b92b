"""Hardware presets for the planner: memory bandwidth, FLOP/s per dtype, capacity and a collective model.

Every number carries its source (``Hardware.sources``), because the planner is only as good as its inputs:
  "measured"  - measured by `helix bench` (a results file in this repository, with its command);
  "public"    - a public measurement, named with its address (PUBLIC below);
  "spec"      - vendor spec sheet (dense tensor-core FLOP/s, peak HBM and NVLink bandwidth);
  "derived"   - a spec number scaled by a measured efficiency of the same chip;
  "fitted"    - fitted to the Helix paper's headline ratios (`helix plan --paper DIR --fit`);
  "assumed"   - a stated guess, to be replaced by `helix plan --calibrate`.

The collective model is `t = alpha + alpha_peer * (n - 1) + coef(op, n) * bytes / bw`, one (alpha, bw) per
op, where `bytes` is the payload per rank and coef is the ring/NVSwitch volume factor (see collectives.py).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field

# fp4 without block scales (the paper's Figure 1 uses 0.5); fp32 for models and caches kept in fp32 (CPU tests,
# exactness runs), whose math runs on the CUDA cores.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
ACT_BYTES = 2.0  # activation memory (not traffic) is sized as bf16; collective payloads use the config's dtype


@dataclass
class Collective:
    alpha_us: float  # fixed cost per call
    bw_gbs: float  # bus bandwidth per GPU, GB/s (1e9 bytes)
    alpha_peer_us: float = 0.0  # extra cost per peer (n - 1); 0 unless fitted from several group sizes
    source: str = "assumed"


@dataclass
class Hardware:
    name: str
    description: str
    memory_gb: float  # HBM capacity per GPU, GB (1e9 bytes)
    mem_bw_gbs: float  # achievable HBM read bandwidth used by the roofline, GB/s
    flops_tflops: dict  # dense tensor-core TFLOP/s per dtype used by the roofline
    link_bw_gbs: float  # NVLink bandwidth per GPU per direction (spec), caps any fitted collective bandwidth
    max_gpus: int  # GPUs in one NVLink domain
    collectives: dict  # op -> Collective
    reserved_gb: float = 2.0  # CUDA context, NCCL buffers, allocator slack (assumed)
    per_layer_overhead_us: float = 0.0  # fixed cost per layer; fitted by calibration (H200) or to the paper (GB200)
    sources: dict = field(default_factory=dict)  # field -> "measured" / "spec" / "derived" / "assumed"

    def flops(self, dtype: str) -> float:
        """Dense FLOP/s for `dtype`; a clear error where the card has no such tensor cores."""
        if dtype not in self.flops_tflops:
            raise ValueError(f"hardware {self.name!r} has no {dtype} tensor cores "
                             f"(it supports {', '.join(self.flops_tflops)}); choose --dtype from those")
        return self.flops_tflops[dtype] * 1e12

    def to_dict(self) -> dict:
        return asdict(self)


def _coll(alpha, bw, source, alpha_peer=0.0):
    return Collective(alpha_us=alpha, bw_gbs=bw, alpha_peer_us=alpha_peer, source=source)


# HBM read bandwidth of one H200, measured by `helix bench` (results/perf/bench-2026-11-29-h200x1-mqa-gqa8.json,
# "memory.hbm_read_gbs"; command: helix bench --gpus 1 --models mqa,gqa8 --contexts 32K,128K,256K --batches 1,8,32
# --baseline --prefill 32K).
H200_HBM_READ_GBS = 4317.1

# Public measurements, each with where it was published. Collective latencies are small-message NCCL all-reduce
# times (the fixed cost alpha); bandwidths are NCCL's effective NVLink bandwidth.
PUBLIC = {
    "h100_bf16_matmul_tflops": (797.5, "bf16 8192^3 torch.matmul on an H100 80GB HBM3, torch 2.7.0+cu128: "
                                       "github.com/zzc0721/torch-performance-test-data/issues/79"),
    "hopper_allreduce_alpha_us": (6.0, "NCCL 2.20.5 all_reduce_perf with CUDA graphs on HGX 8 x H100 (NVLS), "
                                       "'approximately 6us' for 128 B - 64 KiB: github.com/NVIDIA/nccl/issues/1259"),
    "hopper_nccl_bw_gbs": (370.0, "NCCL's effective NVLink 4 bandwidth, 370 of the 450 GB/s line rate (~20% "
                                  "protocol overhead), NCCL maintainer: github.com/NVIDIA/nccl-tests/issues/212"),
    "gb200_allreduce_alpha_us": (6.3, "NCCL 2.27 symmetric-memory all-reduce, ~6.3 us for small messages on 32 GPUs "
                                      "of a GB200 NVL72 (NVIDIA blog 'Enabling Fast Inference and Resilient "
                                      "Training with NCCL 2.27', as quoted and confirmed in "
                                      "github.com/NVIDIA/nccl-tests/issues/333; same thread: 'under 8us' up to 1 KB "
                                      "on 4 GB200, best 5.18 us)"),
}
# NCCL's ~20% protocol overhead (github.com/NVIDIA/nccl-tests/issues/212) applied to the NVLink 5 spec for Blackwell.
NCCL_LINK_EFFICIENCY = PUBLIC["hopper_nccl_bw_gbs"][0] / 450.0

# Vendor spec sheets (dense, no sparsity).
SPEC = {  # fp32: CUDA-core FP32 of the spec sheets (H100/H200 SXM 67, Blackwell 80 TFLOP/s)
    "h100": dict(hbm_tbs=3.35, mem_gb=80, tflops={"fp32": 67, "bf16": 989, "fp8": 1979}, link=450, gpus=8),
    "h200": dict(hbm_tbs=4.8, mem_gb=141, tflops={"fp32": 67, "bf16": 989, "fp8": 1979}, link=450, gpus=8),
    "b200": dict(hbm_tbs=8.0, mem_gb=180, tflops={"fp32": 80, "bf16": 2250, "fp8": 4500, "fp4": 9000}, link=900,
                 gpus=8),
    "gb200": dict(hbm_tbs=8.0, mem_gb=186, tflops={"fp32": 80, "bf16": 2500, "fp8": 5000, "fp4": 10000}, link=900,
                  gpus=72),
}


def _public_collectives(alpha_us: float, bw_gbs: float, source: str) -> dict:
    return {op: _coll(alpha_us, bw_gbs, source) for op in ("all_to_all", "all_reduce", "all_gather")}


def _hopper(name: str, description: str) -> Hardware:
    spec = SPEC[name]
    # H200 and H100 SXM share the GH100 die and clocks (same dense FLOP/s spec); they differ in HBM.
    mm_eff = PUBLIC["h100_bf16_matmul_tflops"][0] / SPEC["h100"]["tflops"]["bf16"]
    mem_eff = H200_HBM_READ_GBS / (SPEC["h200"]["hbm_tbs"] * 1000)
    alpha, bw = PUBLIC["hopper_allreduce_alpha_us"][0], PUBLIC["hopper_nccl_bw_gbs"][0]
    coll = _public_collectives(alpha, bw, f"public: alpha {alpha:g} us (NCCL, 8 x H100), bw {bw:g} GB/s "
                                          "(NCCL effective NVLink 4); all_to_all and all_gather assumed = all_reduce")
    flops = {k: v * mm_eff for k, v in spec["tflops"].items()}
    sources = {"flops_tflops": f"derived: spec x {mm_eff:.3f}, the public H100 bf16 matmul efficiency "
                               f"({PUBLIC['h100_bf16_matmul_tflops'][1]})",
               "collectives": f"public: {PUBLIC['hopper_allreduce_alpha_us'][1]}; {PUBLIC['hopper_nccl_bw_gbs'][1]}",
               "memory_gb": "spec", "link_bw_gbs": "spec", "max_gpus": "spec (HGX, 8 GPUs)",
               "reserved_gb": "assumed"}
    if name == "h200":
        mem_bw = H200_HBM_READ_GBS
        sources["mem_bw_gbs"] = ("measured: helix bench, results/perf/bench-2026-11-29-h200x1-mqa-gqa8.json "
                                 "memory.hbm_read_gbs")
    else:
        mem_bw = spec["hbm_tbs"] * 1000 * mem_eff
        sources["mem_bw_gbs"] = f"derived: H100 spec x {mem_eff:.3f}, the H200 efficiency measured by helix bench"
    return Hardware(name=name, description=description, memory_gb=spec["mem_gb"], mem_bw_gbs=mem_bw,
                    flops_tflops=flops, link_bw_gbs=spec["link"], max_gpus=spec["gpus"], collectives=coll,
                    sources=sources)


def _blackwell(name: str, description: str) -> Hardware:
    spec = SPEC[name]
    # Spec bandwidth and FLOP/s at 100% (as the paper's Figure 1 does with 8000 GB/s); NCCL's public small-message
    # latency on GB200 and its ~20% protocol overhead on the NVLink 5 spec.
    alpha = PUBLIC["gb200_allreduce_alpha_us"][0]
    bw = spec["link"] * NCCL_LINK_EFFICIENCY
    coll = _public_collectives(alpha, bw, f"public: alpha {alpha:g} us (NCCL 2.27, GB200 NVL72), bw {bw:.0f} GB/s "
                                          f"(NVLink 5 spec x {NCCL_LINK_EFFICIENCY:.3f}); all_to_all and "
                                          "all_gather assumed = all_reduce")
    sources = {"mem_bw_gbs": "spec", "flops_tflops": "spec (dense)", "memory_gb": "spec", "link_bw_gbs": "spec",
               "max_gpus": "spec",
               "collectives": f"public: {PUBLIC['gb200_allreduce_alpha_us'][1]}; bandwidth: NVLink 5 spec x the NCCL "
                              f"efficiency of {PUBLIC['hopper_nccl_bw_gbs'][1]}",
               "reserved_gb": "assumed",
               "per_layer_overhead_us": f"fitted ({BLACKWELL_FIXED_COST_US:g} us at alpha {alpha:g} us): least squares "
                                        "on ln of the paper's four headline ratios, `helix plan --paper DIR --fit`"}
    return Hardware(name=name, description=description, memory_gb=spec["mem_gb"], mem_bw_gbs=spec["hbm_tbs"] * 1000,
                    flops_tflops=dict(spec["tflops"]), link_bw_gbs=spec["link"], max_gpus=spec["gpus"],
                    collectives=coll, per_layer_overhead_us=BLACKWELL_FIXED_COST_US, sources=sources)


# The one term fitted to the paper for Blackwell: the per-layer fixed cost (launches, synchronisation, kernel tails,
# everything the roofline and the collective model leave out) that brings the paper's four headline ratios closest
# at the public collective latency (`helix plan --paper docs/planner --fit`; see docs/planner.md).
BLACKWELL_FIXED_COST_US = 25.0


_BUILDERS = {
    "h100": lambda: _hopper("h100", "HGX H100 SXM (8 GPUs, NVLink 4 via NVSwitch)"),
    "h200": lambda: _hopper("h200", "HGX H200 (8 GPUs, NVLink 4 via NVSwitch)"),
    "b200": lambda: _blackwell("b200", "HGX B200 (8 GPUs, NVLink 5)"),
    "gb200": lambda: _blackwell("gb200", "GB200 NVL72 (72 GPUs in one NVLink 5 domain)"),
}
ALIASES = {"gb200-nvl72": "gb200", "nvl72": "gb200", "h100-hgx": "h100", "h200-hgx": "h200", "b200-hgx": "b200"}
HARDWARE_NAMES = tuple(_BUILDERS)


def get_hardware(hw) -> Hardware:
    """A Hardware from a preset name, a JSON file written by `helix plan --calibrate --save-hw`, or a Hardware."""
    if isinstance(hw, Hardware):
        return copy.deepcopy(hw)
    key = str(hw).lower()
    key = ALIASES.get(key, key)
    if key in _BUILDERS:
        return _BUILDERS[key]()
    if os.path.isfile(str(hw)):
        with open(hw) as f:
            return hardware_from_dict(json.load(f))
    raise ValueError(f"unknown hardware {hw!r}: use one of {', '.join(HARDWARE_NAMES)} "
                     f"or a JSON file written by `helix plan --calibrate ... --save-hw FILE`")


def hardware_from_dict(d: dict) -> Hardware:
    d = dict(d)
    d["collectives"] = {k: Collective(**v) for k, v in d["collectives"].items()}
    return Hardware(**d)
