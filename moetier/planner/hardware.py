"""Typed hardware: memory tiers, compute, links and efficiency factors.

A :class:`Machine` is plain data (SI units: bytes, bytes/s, seconds, FLOP/s). The planner,
the cluster planner and the runtime's tiering all read the same objects. Catalog entries
(``machines.py`` beside this file) carry their confidence and source; a measured ``cpu``
machine comes from ``moetier probe``; user overrides come from a TOML/YAML file.

Tiers are ordered nearest (fastest) first: e.g. ``sram`` -> ``hbm`` -> ``dram`` -> ``ssd``
for an accelerator host, or ``dram`` -> ``ssd`` for a CPU-only workstation. The tier that
computes is ``compute_tier`` (weights must be in it, or streamed through it, to be used).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp4")


@dataclass(frozen=True)
class MemoryTier:
    """One level of the weight hierarchy."""

    name: str  # "sram" | "hbm" | "dram" | "ssd" | user-defined
    capacity_bytes: float
    read_bw: float  # bytes/s, peak (multiply by Efficiency.memory for sustained)
    latency_s: float = 0.0  # fixed cost per access / transfer
    write_bw: float | None = None
    # FLOP/s of a processor that can compute on weights *in place* in this tier (e.g. the host
    # CPU next to host DRAM: Fiddler-style offload computes a missed expert there instead of
    # moving it). None = nothing computes here; weights must move to the compute tier.
    compute_flops: float | None = None


@dataclass(frozen=True)
class Link:
    """A data path: between two tiers of one device, or to peer devices."""

    name: str  # "pcie" | "nvlink" | "ib" | "ethernet" | "optical" | ...
    src: str  # tier name, or "device" for device-to-device links
    dst: str
    bw: float  # bytes/s per direction
    latency_s: float = 0.0


@dataclass(frozen=True)
class Efficiency:
    """Sustained fraction of peak, per resource. Printed wherever used."""

    compute: float = 0.7
    memory: float = 0.8
    link: float = 0.8


@dataclass(frozen=True)
class Machine:
    """One device (accelerator or CPU host) with its memory hierarchy."""

    name: str
    tiers: tuple[MemoryTier, ...]  # nearest first
    flops: Mapping[str, float]  # precision -> dense FLOP/s (peak)
    links: tuple[Link, ...] = ()
    efficiency: Efficiency = field(default_factory=Efficiency)
    compute_tier: str = ""  # tier that feeds the compute units; "" = tiers[0]
    # expert parallelism (cluster planner): per-device bandwidth, one direction
    scale_up_bw: float | None = None
    scale_up_domain: int | None = None  # devices in one scale-up domain (e.g. 8, 72)
    scale_out_bw: float | None = None
    devices_per_node: int = 1
    confidence: str = "R"  # "R" read in a vendor document, "U" unverified, "M" measured
    # measured decode GEMV rate (weights/s) of moetier's native kernels per stored format, keyed
    # by census format (bf16, fp32, fp8, int8:g128, int4:g32, fp4, ...): `moetier probe`. Empty:
    # not measured (catalog machines); the planner then bounds decode by memory and FLOPs only.
    kernel_rates: Mapping[str, float] = field(default_factory=dict)
    # True where the cores that run those kernels also do the streaming (a CPU: no separate load
    # units keep the weights coming while the cores dequantize and multiply): a decode step then
    # takes memory time + kernel time, not the larger of the two. False: they overlap (max).
    kernels_add_to_memory: bool = False
    source: str = ""
    notes: tuple[str, ...] = ()

    def tier(self, name: str) -> MemoryTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"machine {self.name!r} has no tier {name!r}; tiers: {[t.name for t in self.tiers]}")

    @property
    def compute_tier_name(self) -> str:
        return self.compute_tier or self.tiers[0].name

    def link(self, src: str, dst: str) -> Link | None:
        for lk in self.links:
            if (lk.src, lk.dst) in ((src, dst), (dst, src)):
                return lk
        return None

    def flops_for(self, precision: str) -> float:
        """Dense FLOP/s for a weight precision, falling back to the nearest wider format."""
        order = {"fp4": ("fp4", "fp8", "int8", "bf16"), "int4": ("int4", "int8", "fp8", "bf16"),
                 "int8": ("int8", "fp8", "bf16"), "fp8": ("fp8", "bf16"), "fp16": ("fp16", "bf16"),
                 "bf16": ("bf16", "fp16"), "fp32": ("fp32", "bf16")}
        for p in order.get(precision, (precision, "bf16")):
            if p in self.flops and self.flops[p]:
                return float(self.flops[p])
        raise KeyError(f"machine {self.name!r} has no compute figure for {precision!r}")

    def kernel_rate(self, fmt: str) -> float | None:
        """Measured weights/s of the decode GEMV reading format ``fmt`` (a census format such as
        ``int4:g32``), or None when not measured. An int format whose group size was not measured
        takes the nearest measured group size of the same width."""
        if not self.kernel_rates:
            return None
        fmt = {"mxfp4": "fp4", "int4": "int4:g128"}.get(fmt, fmt)
        if fmt in self.kernel_rates:
            return float(self.kernel_rates[fmt])
        fam, _, grp = fmt.partition(":")
        if fam not in ("int4", "int8"):
            return None

        def gsize(k: str) -> int:
            g = k.partition(":")[2]
            return int(g[1:]) if g.startswith("g") and g[1:].isdigit() else 0

        same = [k for k in self.kernel_rates if k.partition(":")[0] == fam]
        if not same:
            return None
        want = gsize(fmt) if grp else 128
        return float(self.kernel_rates[min(same, key=lambda k: abs(gsize(k) - want))])

    def with_changes(self, **kw) -> Machine:
        return replace(self, **kw)
