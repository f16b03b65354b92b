"""Hardware presets for the planner: memory bandwidth, FLOP/s per dtype, capacity and a collective model.

Every number carries its source, because the planner is only as good as its inputs:
  "measured"  - measured by this project (DESIGN.md, 4 x H200, torch 2.11.0+cu130, NCCL 2.28.9);
  "spec"      - vendor spec sheet (dense tensor-core FLOP/s, peak HBM and NVLink bandwidth);
  "derived"   - a spec number scaled by an efficiency we measured on another dtype or card;
  "assumed"   - no source; a stated guess, to be replaced by `helix plan --calibrate`.

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


# Our measurements (DESIGN.md, 4 x H200 NV18, NCCL 2.28.9, back-to-back calls). Collective rows feed the same
# least-squares fit as `helix plan --calibrate`, so the H200 preset is fitted, not typed in.
MEASURED_H200 = {
    "hbm_copy_tbs": 4.19,
    "bf16_matmul_tflops": 782.0,
    "collectives": [
        # DESIGN.md gives a range "41 - 46 us" over 4 KiB .. 4 MiB; we take the ends.
        {"op": "all_to_all", "group_size": 4, "bytes_per_rank": 4096, "us": 41.0},
        {"op": "all_to_all", "group_size": 4, "bytes_per_rank": 4 << 20, "us": 46.0},
        {"op": "all_reduce", "group_size": 4, "bytes_per_rank": 4096, "us": 51.0},
        {"op": "all_reduce", "group_size": 4, "bytes_per_rank": 512 << 10, "us": 92.0},
        {"op": "all_reduce", "group_size": 4, "bytes_per_rank": 4 << 20, "us": 88.0},
    ],
}

# Vendor spec sheets (dense, no sparsity).
SPEC = {  # fp32: CUDA-core FP32 of the spec sheets (H100/H200 SXM 67, Blackwell 80 TFLOP/s)
    "h100": dict(hbm_tbs=3.35, mem_gb=80, tflops={"fp32": 67, "bf16": 989, "fp8": 1979}, link=450, gpus=8),
    "h200": dict(hbm_tbs=4.8, mem_gb=141, tflops={"fp32": 67, "bf16": 989, "fp8": 1979}, link=450, gpus=8),
    "b200": dict(hbm_tbs=8.0, mem_gb=180, tflops={"fp32": 80, "bf16": 2250, "fp8": 4500, "fp4": 9000}, link=900,
                 gpus=8),
    "gb200": dict(hbm_tbs=8.0, mem_gb=186, tflops={"fp32": 80, "bf16": 2500, "fp8": 5000, "fp4": 10000}, link=900,
                  gpus=72),
}


def _hopper(name: str, description: str) -> Hardware:
    from .collectives import fit_collectives  # local import: collectives imports this module

    spec = SPEC[name]
    # Efficiencies measured on H200: HBM copy vs 4.8 TB/s spec, bf16 matmul vs 989 TFLOP/s spec.
    mem_eff = MEASURED_H200["hbm_copy_tbs"] / SPEC["h200"]["hbm_tbs"]
    mm_eff = MEASURED_H200["bf16_matmul_tflops"] / SPEC["h200"]["tflops"]["bf16"]
    coll = fit_collectives(MEASURED_H200["collectives"], link_bw_gbs=spec["link"])
    if name == "h200":
        mem_bw = MEASURED_H200["hbm_copy_tbs"] * 1000
        flops = {"fp32": spec["tflops"]["fp32"] * mm_eff, "bf16": MEASURED_H200["bf16_matmul_tflops"],
                 "fp8": spec["tflops"]["fp8"] * mm_eff}
        sources = {"mem_bw_gbs": "measured (HBM copy 4.19 TB/s)", "flops_tflops.bf16": "measured (782 TFLOP/s)",
                   "flops_tflops.fp8": "derived (spec x measured bf16 efficiency)",
                   "flops_tflops.fp32": "derived (CUDA-core spec x measured bf16 efficiency)",
                   "collectives": "measured (fit of DESIGN.md all_to_all / all_reduce on 4 x H200)"}
    else:
        mem_bw = spec["hbm_tbs"] * 1000 * mem_eff
        flops = {k: v * mm_eff for k, v in spec["tflops"].items()}
        sources = {"mem_bw_gbs": "derived (H100 spec x H200-measured HBM efficiency)",
                   "flops_tflops": "derived (H100 spec x H200-measured matmul efficiency)",
                   "collectives": "assumed (H200 measured fit; same NVLink 4 / NVSwitch generation)"}
        for c in coll.values():
            c.source = "assumed (= H200 measured)"
    sources.update({"memory_gb": "spec", "link_bw_gbs": "spec", "max_gpus": "spec (HGX, 8 GPUs)",
                    "reserved_gb": "assumed"})
    return Hardware(name=name, description=description, memory_gb=spec["mem_gb"], mem_bw_gbs=mem_bw,
                    flops_tflops=flops, link_bw_gbs=spec["link"], max_gpus=spec["gpus"], collectives=coll,
                    sources=sources)


def _blackwell(name: str, description: str) -> Hardware:
    spec = SPEC[name]
    # No Blackwell in our lab: spec bandwidth/FLOPs at 100% (as the paper's Figure 1 does with 8000 GB/s) and an
    # assumed small-message latency typical of NVLink-5 one-shot collectives.
    coll = {op: _coll(5.0, spec["link"] * 0.8, "assumed (5 us, 80% of NVLink spec)")
            for op in ("all_to_all", "all_reduce", "all_gather")}
    sources = {"mem_bw_gbs": "spec", "flops_tflops": "spec (dense)", "memory_gb": "spec", "link_bw_gbs": "spec",
               "max_gpus": "spec", "collectives": "assumed", "reserved_gb": "assumed",
               "per_layer_overhead_us": f"fitted ({BLACKWELL_FIXED_COST_US:g} us): least squares on ln of the paper's "
                                        "four headline ratios, `helix plan --paper DIR --fit`"}
    return Hardware(name=name, description=description, memory_gb=spec["mem_gb"], mem_bw_gbs=spec["hbm_tbs"] * 1000,
                    flops_tflops=dict(spec["tflops"]), link_bw_gbs=spec["link"], max_gpus=spec["gpus"],
                    collectives=coll, per_layer_overhead_us=BLACKWELL_FIXED_COST_US, sources=sources)


# The one fitted term for Blackwell: the per-layer fixed cost (launches, synchronisation, kernel tails, everything
# the roofline and the collective model leave out) that brings the paper's four headline ratios closest
# (`helix plan --paper docs/planner --fit`, 2026-11-29: grid 0..60 us, best 35 us; see docs/planner.md).
BLACKWELL_FIXED_COST_US = 35.0


_BUILDERS = {
    "h100": lambda: _hopper("h100", "HGX H100 SXM (8 GPUs, NVLink 4 via NVSwitch)"),
    "h200": lambda: _hopper("h200", "HGX H200 (8 GPUs, NVLink 4 via NVSwitch); lab machine has 4"),
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
