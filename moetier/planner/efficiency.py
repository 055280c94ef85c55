"""Per-chip and per-fabric efficiency of the cluster planner, from first principles + cited facts.

Pure data and small functions (imports only :mod:`moetier.planner.hardware`). Every constant
here is a *fact or a derivation from one*; its source is in ``docs/cluster-planner.md``
("Where each constant comes from"). The few factors fitted to published figures live in
:mod:`moetier.planner.calibration`, apart from these.

What is modelled (per device):

* **GEMM**: ``time = FLOPs_padded / (peak(precision) x gemm_eff(precision))``, where the
  token rows of one matrix multiply (``M``: tokens per expert for the routed experts, tokens
  per device for the dense ones) are padded up to the tensor-core tile (``mma_m``: 64 rows for
  Hopper ``wgmma``, 128 for Blackwell ``tcgen05``, 16 for Ascend's cube unit). A GEMM with a
  handful of rows is therefore memory-bound (the roofline's byte term) and, once its padded
  FLOPs dominate, compute-bound at the tile-padded cost; the precision sets the peak
  (FP4 tensor cores on B200/GB200, FP8 on Hopper, INT8 on Ascend).
* **Attention core** (MLA and GQA): ``max(FLOPs / (peak x attn_compute), KV bytes / (HBM x
  attn_memory))``; decode MLA attention is KV-bound at small batch x context and
  compute-bound (128 heads share one latent) at large.
* **Memory**: weights stream at ``HBM x memory``.
* **Kernel floors**: a kernel cannot finish faster than ``kernel_floor_s`` (launch from a CUDA
  graph + ramp + tail); each operation of each layer is ``kernels`` kernels. This is what
  binds a batch-1 step.
* **Links** (alpha-beta / Hockney model): one collective of ``n`` bytes per device costs
  ``alpha + n / (bw x link_eff)``; alpha is the fabric's latency floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moetier.planner.hardware import Machine

# Precision families of a GEMM's compute (weights x activations): what the tensor core runs.
_RATE_KEY = {"nvfp4": "fp4", "mxfp4": "fp4", "fp4": "fp4", "int4": "int4", "int8": "int8", "fp8": "fp8",
             "bf16": "bf16", "fp16": "bf16", "fp32": "fp32"}


def rate_key(fmt: str) -> str:
    """The tensor-core rate family of a weight format (``nvfp4`` -> ``fp4``, ``int4:g128`` -> ``int4``)."""
    f = fmt.split(":", 1)[0].lower()
    return _RATE_KEY.get(f, f)


_FALLBACK = {"fp4": ("fp4", "fp8", "int8", "bf16"), "int4": ("int4", "int8", "fp8", "bf16"),
             "int8": ("int8", "fp8", "bf16"), "fp8": ("fp8", "bf16"), "bf16": ("bf16", "fp16"),
             "fp32": ("fp32", "bf16")}


def compute_key(machine: Machine, fmt: str) -> str:
    """The tensor-core rate family a weight format actually runs at on ``machine``.

    A chip without FP4 (INT4) units computes FP4 (INT4) weights at its FP8/INT8 rate (the weights
    are up-converted in the GEMM's main loop): ``fp4`` on Hopper -> ``fp8``.
    """
    k = rate_key(fmt)
    for cand in _FALLBACK.get(k, (k, "bf16")):
        if machine.flops.get(cand):
            return cand
    raise KeyError(f"machine {machine.name!r} has no compute figure for {fmt!r}")


@dataclass(frozen=True)
class ChipEff:
    """Achievable fractions of a chip's peaks and its kernel floor (see module docstring)."""

    family: str
    gemm: dict[str, float]  # rate family -> sustained fraction of dense peak for a large GEMM
    mma_m: int  # token rows of one tensor-core tile
    memory: float  # weight streaming: fraction of HBM peak
    attn_compute: float  # attention core: fraction of the attention dtype's peak
    attn_memory: float  # attention core: fraction of HBM peak reading the KV cache
    kernel_floor_s: float  # shortest kernel (graph launch + ramp + tail)
    comm_sm_share: float  # share of the compute units a normal-mode (prefill) all-to-all occupies
    cite: str = ""

    def gemm_eff(self, fmt: str) -> float:
        k = rate_key(fmt)
        return self.gemm.get(k, self.gemm.get("default", 0.6))


@dataclass(frozen=True)
class Fabric:
    """One link class of a device: sustained fraction of its bandwidth and a latency floor."""

    name: str
    link_eff: float
    alpha_s: float  # fixed cost of one collective phase (dispatch, combine, all-reduce step)
    cite: str = ""


HOPPER = ChipEff(
    family="hopper", gemm={"fp8": 0.78, "bf16": 0.75, "int8": 0.75, "default": 0.75}, mma_m=64,
    memory=0.8, attn_compute=0.67, attn_memory=0.9, kernel_floor_s=4e-6, comm_sm_share=24 / 132,
    cite="DeepGEMM FP8 up to 1,550 TF/s on H800 (0.78); FlashMLA 660 TF/s BF16 / 3,000 GB/s on H800; "
         "DeepEP normal kernels take 24 of 132 SMs",
)
BLACKWELL = ChipEff(
    family="blackwell", gemm={"fp4": 0.55, "fp8": 0.55, "bf16": 0.55, "int8": 0.55, "default": 0.55}, mma_m=128,
    memory=0.8, attn_compute=0.67, attn_memory=0.9, kernel_floor_s=4e-6, comm_sm_share=24 / 148,
    cite="a public GB200 GEMM measurement reached ~0.55 of dense FP8 peak (hardware.md): the measured "
         "figure on this chip is used for every precision (no public FP4 figure); tcgen05 tile M=128; "
         "attention fractions as Hopper (FlashMLA, U)",
)
ASCEND = ChipEff(
    family="ascend", gemm={"int8": 0.6, "bf16": 0.6, "default": 0.6}, mma_m=16,
    memory=0.8, attn_compute=0.5, attn_memory=0.8, kernel_floor_s=4e-6, comm_sm_share=0.0,
    cite="no public GEMM microbenchmark: 0.6 (U); cube unit 16x16x16; no public per-kernel floor for "
         "graph-mode Ascend kernels: the GPUs' 4 us (U; fitted separately, B200's batch-1 and Ascend's "
         "15-ms figures both put the floor at ~8 us); all-to-all on UB runs on separate engines "
         "(CloudMatrix384 paper): no compute taken",
)
GENERIC = ChipEff(
    family="generic", gemm={"default": 0.6}, mma_m=64, memory=0.8, attn_compute=0.5, attn_memory=0.8,
    kernel_floor_s=5e-6, comm_sm_share=0.15, cite="no chip-specific figures: catalog defaults (U)",
)

_CHIPS = (("h100", HOPPER), ("h800", HOPPER), ("h200", HOPPER), ("h20", HOPPER),
          ("b200", BLACKWELL), ("gb200", BLACKWELL), ("gb300", BLACKWELL), ("b300", BLACKWELL),
          ("ascend", ASCEND), ("910", ASCEND))


def chip_eff(machine: Machine) -> ChipEff:
    """The chip family's efficiencies; unknown chips use the machine's catalog efficiency."""
    n = machine.name.lower()
    for prefix, eff in _CHIPS:
        if n.startswith(prefix):
            return eff
    e = machine.efficiency
    return ChipEff(family="catalog", gemm={"default": e.compute}, mma_m=64, memory=e.memory,
                   attn_compute=min(e.compute, 0.6), attn_memory=e.memory, kernel_floor_s=GENERIC.kernel_floor_s,
                   comm_sm_share=GENERIC.comm_sm_share,
                   cite=f"{machine.name}: catalog efficiency (compute {e.compute:g}, memory {e.memory:g})")


# ---- fabrics
NVLINK4 = Fabric("NVLink4 (NVSwitch, 8 GPUs)", 0.78, 3e-6,
                 "DeepEP intranode 153-158 GB/s of H800's 200 GB/s NVLink; NVSwitch hop ~1-3 us")
NVLINK5 = Fabric("NVLink5 (NVSwitch)", 0.78, 3e-6,
                 "same kernels on NVLink5: no better public microbenchmark; latency as NVLink4 (U)")
NVLINK5_72 = Fabric("NVLink5 NVL72 (one NVSwitch tier, 72 GPUs)", 0.78, 5e-6,
                    "multi-node NVLink: one more switch traversal than NVL8 (U)")
IB_NDR = Fabric("InfiniBand NDR 400G (1 NIC/GPU)", 0.8, 10e-6,
                "DeepEP low-latency kernels: ~39-46 GB/s of 50 GB/s at EP64-256 (0.8); fixed cost fitted as "
                "10 us per dispatch/combine on H800 (earlier calibration, kept)")
IB_XDR = Fabric("InfiniBand XDR / 800G NIC", 0.8, 10e-6, "as NDR at twice the rate (ConnectX-8); U")
ROCE = Fabric("RoCEv2 Ethernet (400G/800G)", 0.7, 15e-6,
              "RoCE: congestion control + PFC; ~0.7 of line rate for all-to-all (U); latency above IB")
UB = Fabric("Huawei Unified Bus (CloudMatrix384)", 0.7, 5e-6,
            "CloudMatrix384 paper: UB >= 392 GB/s per dir per chip, remote access ~1.5 us vs >10 us over "
            "PCIe+IB; dispatch/combine kernels reach ~0.7 of it (U)")
NEURONLINK = Fabric("AWS NeuronLink", 0.7, 10e-6, "Trn3: chip-to-chip latency just under 10 us (hardware.md); U")
ICI = Fabric("Google ICI", 0.7, 5e-6, "U")
GENERIC_LINK = Fabric("generic link", 0.8, 10e-6, "catalog link efficiency 0.8, 10 us floor (U)")


@dataclass(frozen=True)
class Fabrics:
    scale_up: Fabric
    scale_out: Fabric
    notes: tuple[str, ...] = field(default_factory=tuple)


def fabrics(machine: Machine) -> Fabrics:
    """The scale-up and scale-out link classes of ``machine`` (by chip family and domain size)."""
    n = machine.name.lower()
    dom = int(machine.scale_up_domain or machine.devices_per_node or 1)
    out_bw = machine.scale_out_bw or 0.0
    if n.startswith(("gb200", "gb300")) or (n.startswith(("b200", "b300")) and dom > 8):
        up = NVLINK5_72 if dom > 8 else NVLINK5
    elif n.startswith(("b200", "b300")):
        up = NVLINK5
    elif n.startswith(("h100", "h800", "h200", "h20")):
        up = NVLINK4 if dom <= 8 else NVLINK5_72
    elif n.startswith(("ascend", "910")):
        up = UB
    elif n.startswith(("trainium", "trn")):
        up = NEURONLINK
    elif n.startswith("tpu"):
        up = ICI
    else:
        up = GENERIC_LINK
    if n.startswith(("ascend", "910")):
        out = ROCE
    elif out_bw >= 100e9:
        out = IB_XDR
    elif out_bw:
        out = IB_NDR
    else:
        out = GENERIC_LINK
    return Fabrics(up, out)


def padded_rows(m: float, tile: int) -> float:
    """Token rows after padding ``m`` (>= 0, may be fractional on average) up to whole tiles."""
    if m <= 0:
        return 0.0
    return math.ceil(m / tile - 1e-9) * tile


def collective_s(nbytes: float, bw: float, fab: Fabric, phases: int = 1) -> float:
    """alpha-beta cost of ``phases`` collective phases moving ``nbytes`` in total over one link class."""
    if nbytes <= 0:
        return 0.0
    if bw <= 0:
        return math.inf
    return phases * fab.alpha_s + nbytes / (bw * fab.link_eff)
