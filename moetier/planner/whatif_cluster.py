"""Bottleneck migration at cluster scale: change one resource at a time, watch the triangle.

The seed's chain: put the hot weights close to the compute (an SRAM tier per chip) and memory
time falls; the expert-parallel all-to-all then takes the larger share of the step; faster
scale-up links help only the traffic that stays inside the domain; faster (optical) scale-out
and bigger scale-up domains (NVL72, Trn3 UltraServer 144, CloudMatrix 384) move the rest.

Changes (``KEY=VALUE``, applied cumulatively in the order given):

==================  ======================================================================
``sram=SIZE@BW``    add an on-chip ``sram`` tier holding the hottest weights (always-on
                    first, then local experts); ``sram=weights@10x`` sizes it to the
                    device's weights at 10x the HBM bandwidth (hypothetical)
``hbm_bw=F``        HBM bandwidth: ``2x`` or an absolute ``6TB/s``
``flops=F``         every FLOP/s figure
``scale_up_bw=F``   per-device scale-up bandwidth (NVLink / NeuronLink / UB)
``scale_out_bw=F``  per-device scale-out bandwidth (``4x`` = optical what-if)
``domain=N``        devices per scale-up domain (72 = NVL72, 144 = Trn3 UltraServer,
                    384 = CloudMatrix 384)
``batch=B``         requests (decode) / tokens (prefill) per device
==================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from moetier.errors import MoetierError
from moetier.planner.calibration import Calibration
from moetier.planner.cluster import ClusterResult, Layout, plan_cluster
from moetier.planner.hardware import Machine, MemoryTier
from moetier.planner.roofline import scale_or_set
from moetier.spec import ModelSpec

DEFAULT_CHAIN: tuple[str, ...] = (
    "sram=weights@10x",
    "scale_up_bw=900GB/s",
    "scale_out_bw=4x",
    "domain=72",
    "domain=144",
    "domain=384",
)
KEYS = ("sram", "hbm_bw", "flops", "scale_up_bw", "scale_out_bw", "domain", "batch")


@dataclass(frozen=True)
class Step:
    label: str
    machine: Machine
    layout: Layout
    result: ClusterResult


def apply_change(spec: ModelSpec, machine: Machine, layout: Layout, change: str, *,
                 precision: str = "fp8", calibration: Calibration | None = None) -> tuple[Machine, Layout, str]:
    """One ``KEY=VALUE`` change -> (machine, layout, label)."""
    key, sep, val = change.partition("=")
    key = key.strip().lower().replace("-", "_")
    if not sep or key not in KEYS:
        raise MoetierError(f"--what-if {change!r}: expected KEY=VALUE with KEY in {', '.join(KEYS)}")
    hbm = machine.tier(machine.compute_tier_name)
    if key == "sram":
        size_s, _, bw_s = val.partition("@")
        if size_s.strip().lower() == "weights":
            base = plan_cluster(spec, machine, layout, precision=precision, calibration=calibration)
            size = base.weight_bytes
        else:
            size = scale_or_set(None, size_s, "sram size")
        bw = scale_or_set(hbm.read_bw, bw_s or "10x", "sram bandwidth")
        tiers = tuple(t for t in machine.tiers if t.name != "sram")
        m = machine.with_changes(tiers=(MemoryTier("sram", size, bw),) + tiers,
                                 compute_tier=machine.compute_tier_name)
        return m, layout, f"+ SRAM hot-weight tier {size / 1e9:.1f} GB at {bw / 1e12:.1f} TB/s"
    if key == "hbm_bw":
        bw = scale_or_set(hbm.read_bw, val, "hbm_bw")
        tiers = tuple(replace(t, read_bw=bw) if t.name == hbm.name else t for t in machine.tiers)
        return machine.with_changes(tiers=tiers), layout, f"HBM bandwidth {bw / 1e12:.2f} TB/s"
    if key == "flops":
        f = scale_or_set(1.0, val, "flops")
        return (machine.with_changes(flops={k: v * f for k, v in machine.flops.items()}), layout,
                f"FLOP/s x{f:g}")
    if key == "scale_up_bw":
        bw = scale_or_set(machine.scale_up_bw, val, "scale_up_bw")
        return machine.with_changes(scale_up_bw=bw), layout, f"scale-up {bw / 1e9:.0f} GB/s per device"
    if key == "scale_out_bw":
        bw = scale_or_set(machine.scale_out_bw, val, "scale_out_bw")
        return machine.with_changes(scale_out_bw=bw), layout, f"scale-out {bw / 1e9:.0f} GB/s per device"
    if key == "domain":
        try:
            n = int(val)
        except ValueError:
            raise MoetierError(f"--what-if domain: expected an integer, got {val!r}") from None
        if n < 1:
            raise MoetierError(f"--what-if domain: must be >= 1, got {n}")
        return machine.with_changes(scale_up_domain=n), layout, f"scale-up domain {n} devices"
    try:
        b = float(val)
    except ValueError:
        raise MoetierError(f"--what-if batch: expected a number, got {val!r}") from None
    if b <= 0:
        raise MoetierError(f"--what-if batch: must be > 0, got {val!r}")
    return machine, replace(layout, batch=b), f"batch {b:g} per device"


def what_if_chain(spec: ModelSpec, machine: Machine, layout: Layout,
                  changes: tuple[str, ...] | list[str] = DEFAULT_CHAIN, *, precision: str = "fp8",
                  calibration: Calibration | None = None) -> list[Step]:
    """Baseline, then each change applied on top of the previous ones."""
    steps = [Step("baseline", machine, layout,
                  plan_cluster(spec, machine, layout, precision=precision, calibration=calibration))]
    m, lay = machine, layout
    for ch in changes:
        m, lay, label = apply_change(spec, m, lay, ch, precision=precision, calibration=calibration)
        steps.append(Step(label, m, lay, plan_cluster(spec, m, lay, precision=precision, calibration=calibration)))
    return steps


def format_chain(steps: list[Step]) -> str:
    r0 = steps[0].result
    lay = r0.layout
    head = (f"bottleneck migration: {r0.model}, {lay.phase}, {lay.devices} x {r0.machine}, ep {lay.ep}, "
            f"batch {lay.batch:g}/device, context {lay.context:g} (changes are cumulative)")
    lines = [head,
             f"  {'change':44s} {'tok/s/node':>11s} {'tok/s/user':>10s} {'compute':>8s} {'memory':>7s} "
             f"{'comm':>6s}  bottleneck"]
    prev = None
    for s in steps:
        r = s.result
        sh = r.shares
        lines.append(f"  {s.label[:44]:44s} {r.tokens_per_s_per_node:11,.0f} {r.tokens_per_s_per_user:10.1f} "
                     f"{sh['compute']:8.0%} {sh['memory']:7.0%} {sh['communication']:6.0%}  {r.bottleneck}")
        if prev is not None and prev.bottleneck != r.bottleneck:
            lines.append(f"  {'':44s} -> the binding resource moved from {prev.bottleneck} to {r.bottleneck}")
        prev = r
    return "\n".join(lines)


SWEEP_RESOURCES = ("hbm_bw", "flops", "scale_up_bw", "scale_out_bw")


def share_sweep(spec: ModelSpec, machine: Machine, layout: Layout, resource: str = "hbm_bw",
                factors: tuple[float, ...] = (1, 2, 4, 8, 16, 32), *, precision: str = "fp8",
                calibration: Calibration | None = None) -> list[tuple[float, ClusterResult]]:
    """Scale one resource by each factor (from the baseline) and plan again."""
    if resource not in SWEEP_RESOURCES:
        raise MoetierError(f"--what-if-scale: resource must be one of {', '.join(SWEEP_RESOURCES)}, got {resource!r}")
    out = []
    for f in factors:
        m, lay, _ = apply_change(spec, machine, layout, f"{resource}={f:g}x", precision=precision,
                                 calibration=calibration)
        out.append((float(f), plan_cluster(spec, m, lay, precision=precision, calibration=calibration)))
    return out


def plot_shares(sweep: list[tuple[float, ClusterResult]], path: str | Path, resource: str = "hbm_bw") -> Path:
    """Stacked shares of the triangle (compute / memory / communication) vs the scaled resource."""
    from moetier.extras import require

    require("plot", "moetier plan --what-if-plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [f for f, _ in sweep]
    comp = [r.shares["compute"] for _, r in sweep]
    mem = [r.shares["memory"] for _, r in sweep]
    com = [r.shares["communication"] for _, r in sweep]
    r0 = sweep[0][1]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.stackplot(xs, comp, mem, com, labels=["compute", "memory", "communication"],
                 colors=["#4c72b0", "#dd8452", "#55a868"], alpha=0.9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{resource} x (relative to {r0.machine})")
    ax.set_ylabel("share of step time (before overlap)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{r0.model} {r0.layout.phase}, {r0.layout.devices} devices, ep {r0.layout.ep}: triangle shares")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.tokens_per_s_per_node for _, r in sweep], "k.-", label="tokens/s per node")
    ax2.set_ylabel("tokens/s per node")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
