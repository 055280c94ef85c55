"""``moetier plan MODEL --devices N ...``: the cluster planner's command line and text output.

Split from :mod:`moetier.planner.cluster` (the model) so the import graph is a tree:
``efficiency -> calibration -> cluster -> {whatif_cluster, published} -> cluster_cli``.
``commands/plan.py`` calls :func:`add_cluster_args`, :func:`wants_cluster` and
:func:`run_plan_command`.

Display rules: times in s / ms / us with three significant digits (``472 ms``, ``85.3 us``),
counts rounded to what a person reads (``89 requests/device``; below 10 one decimal; a
fraction of a request per device is shown with the TP group it belongs to).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from typing import Any

from moetier.planner import calibration as calib
from moetier.planner import eplb
from moetier.planner.calibration import Calibration
from moetier.planner.cluster import (
    A2A_MODES,
    PHASES,
    ClusterError,
    ClusterResult,
    Layout,
    plan_cluster,
    search,
    validate,
)
from moetier.planner.hardware import Machine
from moetier.spec import ModelSpec

# ---------------------------------------------------------------------------------------
# units a person reads


def fmt_time(s: float) -> str:
    """``0.472 -> '472 ms'``, ``3.4567e-3 -> '3.46 ms'``, ``8.53e-5 -> '85.3 us'``, ``1.5 -> '1.50 s'``."""
    if s is None or not math.isfinite(s):
        return "-"
    a = abs(s)
    if a >= 1.0:
        return f"{s:.3g} s" if a < 100 else f"{s:,.0f} s"
    if a >= 1e-3:
        v = s * 1e3
        return f"{v:.3g} ms" if abs(v) < 100 else f"{v:.0f} ms"
    if a == 0:
        return "0 ms"
    v = s * 1e6
    return f"{v:.3g} us" if abs(v) < 100 else f"{v:.0f} us"


def fmt_count(x: float) -> str:
    """Counts for reading: >= 10 -> nearest integer with separators; 1-10 -> one decimal; < 1 -> 2 significant."""
    if x >= 10 or x == int(x):
        return f"{round(x):,}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2g}"


def fmt_rate(x: float) -> str:
    """tokens/s for reading: >= 100 -> integer; below one decimal."""
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _si(v: float, unit: str) -> str:
    from moetier.planner.machines import fmt_si

    return fmt_si(v, unit)


def _batch_text(lay: Layout) -> str:
    unit = "requests" if lay.phase == "decode" else "tokens"
    if lay.phase == "decode" and lay.batch < 1 and lay.tp > 1:
        group = lay.batch * lay.tp
        return (f"{fmt_count(group)} {'request' if fmt_count(group) == '1' else unit} per TP group of {lay.tp} "
                f"({fmt_count(lay.batch)}/device)")
    return f"batch {fmt_count(lay.batch)} {unit}/device"


def summary_lines(r: ClusterResult) -> list[str]:
    lay = r.layout
    sh = r.shares
    lo, hi = r.band
    lines = [
        f"{r.model} on {lay.devices} x {r.machine} ({lay.phase}): ep {lay.ep}, dp {lay.dp}, tp {lay.tp}, "
        f"{_batch_text(lay)}, context {fmt_count(lay.context)}"
        + (f", cached {lay.cached_fraction:.1%}" if lay.cached_fraction else "")
        + (f", {lay.redundant_experts} redundant experts" if lay.redundant_experts else "")
        + (", two-batch overlap" if r.micro_batches == 2 else
           ", no overlap (fewer than 2 requests to split)" if lay.two_batch_overlap else ", no overlap"),
        f"  tokens/s per device {fmt_rate(r.tokens_per_s_per_device)} | per node of {r.devices_per_node} "
        f"{fmt_rate(r.tokens_per_s_per_node)} | per user {fmt_rate(r.tokens_per_s_per_user)}"
        + (f" (TTFT {fmt_time(r.ttft_s)})" if lay.phase == "prefill" else ""),
        f"  uncertainty: {fmt_rate(lo)}-{fmt_rate(hi)} tok/s per node (x/÷ {1 + calib.LOCO_MEDIAN_ABS:.2f}: median "
        f"leave-one-chip-out error over {calib.N_FIGURES} published figures; worst {calib.LOCO_MAX_ABS:.0%})",
        f"  step {fmt_time(r.step_s)} = compute {fmt_time(r.compute_s)} + memory {fmt_time(r.memory_s)} "
        f"+ communication {fmt_time(r.comm_s)} + kernel-launch floors {fmt_time(r.latency_s)} "
        f"- overlap {fmt_time(r.hidden_s)}",
        f"  shares: compute {sh['compute']:.0%}, memory {sh['memory']:.0%}, communication "
        f"{sh['communication']:.0%}, launch floors {sh['latency']:.0%} -> bottleneck: {r.bottleneck}",
        f"  per device: weights {r.weight_bytes / 1e9:.1f} GB + KV {r.kv_bytes / 1e9:.1f} GB of "
        f"{r.capacity_bytes / 1e9:.0f} GB; expert-load imbalance (max/mean) {r.imbalance:.2f}",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return lines


def explain_lines(r: ClusterResult) -> list[str]:
    """The arithmetic behind a prediction: bytes, FLOPs, times, which term binds."""
    lay = r.layout
    cal = r.calibration
    out = ["arithmetic (per device, per step):", f"  fitted factors: {cal.describe()}"]
    if r.chip is not None:
        c = r.chip
        gem = ", ".join(f"{k} {v:g}" for k, v in c.gemm.items())
        out.append(f"  chip ({c.family}): GEMM efficiency {gem}; tile {c.mma_m} token rows; weights stream at "
                   f"{c.memory:g} of HBM; attention {c.attn_compute:g} of peak / {c.attn_memory:g} of HBM; "
                   f"kernel floor {fmt_time(c.kernel_floor_s)}")
    if r.fabrics is not None:
        f = r.fabrics
        out.append(f"  scale-up {f.scale_up.name}: {f.scale_up.link_eff:g} of bandwidth, floor "
                   f"{fmt_time(f.scale_up.alpha_s)}; scale-out {f.scale_out.name}: {f.scale_out.link_eff:g}, "
                   f"floor {fmt_time(f.scale_out.alpha_s)}")
    counted = (f"counted input tokens incl. cache hits: {fmt_count(r.tokens_per_step)}" if lay.phase == "prefill"
               else f"output tokens: {fmt_count(r.tokens_per_step)}")
    out.append(f"  tokens computed this step: {fmt_count(r.computed_tokens_per_step)}; {counted}")
    out.append(f"  {'operation':22s} {'prec':>5s} {'FLOPs':>10s} {'bytes':>10s} {'compute':>9s} {'memory':>9s} "
               f"{'floor':>9s}  binds")
    for o in r.ops:
        out.append(f"  {o.name:22s} {o.precision:>5s} {_si(o.flops, 'F'):>10s} {_si(o.bytes, 'B'):>10s} "
                   f"{fmt_time(o.compute_s):>9s} {fmt_time(o.memory_s):>9s} {fmt_time(o.floor_s):>9s}  {o.bound}"
                   + (f" (at {_si(o.flop_rate, 'FLOP/s')}, {_si(o.mem_rate, 'B/s')})" if o.flops else ""))
        if o.hot_fraction:
            out.append(f"  {'':22s} {o.hot_fraction:.0%} of its weights read from the sram tier at "
                       f"{_si(o.hot_rate, 'B/s')}")
    c = r.comm
    if c is not None:
        n_moe = round((r.comm_s - r.tp_comm_s) / c.time_s) if c.time_s else 0
        out.append(f"  all-to-all per MoE layer ({c.mode}): {c.pairs_per_token:g} pairs/token x "
                   f"(dispatch {c.dispatch_bytes_per_pair:,.0f} B + combine {c.combine_bytes_per_pair:,.0f} B), "
                   f"x imbalance {r.imbalance:.2f}")
        out.append(f"    scale-out {_si(c.scale_out_bytes, 'B')} -> {fmt_time(c.scale_out_s)}; scale-up "
                   f"{_si(c.scale_up_bytes, 'B')} -> {fmt_time(c.scale_up_s)}; latency floors {fmt_time(c.latency_s)} "
                   f"({c.fabric}); {c.frac_inside:.0%} of remote copies stay inside the scale-up domain; "
                   f"binds: {c.link}")
        out.append(f"    x {n_moe} MoE layers = {fmt_time(r.comm_s - r.tp_comm_s)}")
    if r.tp_comm_s:
        out.append(f"  TP all-reduces (attention and FFN outputs, every layer): {fmt_time(r.tp_comm_s)}")
    if r.hidden_s:
        out.append(f"  two-batch overlap hides {cal.overlap:g} x min(local work, all-to-all) per MoE layer = "
                   f"{fmt_time(r.hidden_s)}")
    out.append(f"  step = {fmt_time(r.compute_s)} + {fmt_time(r.memory_s)} + {fmt_time(r.comm_s)} + "
               f"{fmt_time(r.latency_s)} - {fmt_time(r.hidden_s)} = {fmt_time(r.step_s)}; "
               f"binding resource: {r.bottleneck}")
    return out


# ---------------------------------------------------------------------------------------
# command line (hooked into `moetier plan` by moetier/commands/plan.py)

_CLUSTER_FLAGS = ("ep", "dp", "tp", "phase", "search", "published")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Add the cluster options to ``moetier plan`` (skips any flag the parser already has)."""
    g = parser.add_argument_group("cluster planner (used with --devices N, or any of these)")
    have = set(parser._option_string_actions)

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            g.add_argument(flag, **kw)

    add("--devices", type=int, default=None, help="devices in the deployment")
    add("--ep", type=int, default=None, help="expert-parallel group size (default: devices)")
    add("--dp", type=int, default=None, help="attention data-parallel groups (default: devices / tp)")
    add("--tp", type=int, default=None, help="attention tensor-parallel ranks (default 1)")
    add("--phase", choices=PHASES, default=None, help="decode (default) or prefill")
    add("--batch-per-device", type=float, default=None,
        help="decode: requests per device; prefill: new tokens per device per step")
    add("--cached-fraction", type=float, default=0.0, help="prefill: share of prompt tokens from a KV cache")
    add("--redundant-experts", type=int, default=None, help="extra expert slots for replicas of hot experts")
    add("--imbalance", type=float, default=None, help="override max/mean expert load per device")
    add("--routing-profile", default=None, metavar="FILE",
        help="per-expert loads: JSON list / {'loads': [...]} or a routing-trace .jsonl")
    add("--zipf", type=float, default=0.0, help="routing skew as a Zipf exponent (0 = uniform)")
    add("--dispatch-dtype", choices=("fp8", "bf16", "fp4"), default="fp8", help="all-to-all dispatch format")
    add("--combine-dtype", choices=("fp8", "bf16"), default="bf16", help="all-to-all combine format")
    add("--kv-dtype", choices=("fp8", "bf16", "fp16", "fp32"), default="bf16", help="KV-cache format")
    add("--attention-dtype", choices=("bf16", "fp8"), default="bf16",
        help="attention core (QK^T, PV) compute format; projections follow --precision")
    add("--mtp-tokens", type=int, default=0, help="decode: speculative (MTP) tokens verified per step")
    add("--mtp-acceptance", type=float, default=0.0, help="decode: acceptance rate of each draft token")
    add("--a2a", choices=A2A_MODES, default="auto",
        help="all-to-all style: direct pairs (decode default) or dedup per domain (prefill default)")
    add("--search", action="store_true",
        help="search the layout parameters NOT given (tp/dp, ep, redundant experts, overlap, batch) for max "
             "tokens/s per node; every parallelism flag given is kept")
    add("--target-tps-per-user", type=float, default=None, help="--search: minimum tokens/s per user")
    add("--explain", action="store_true", help="print the arithmetic behind the prediction (and the search space)")
    add("--published", action="store_true",
        help="predict every published measurement in moetier/data/published (in-sample and leave-one-chip-out); "
             "MODEL and --machine are not used")
    add("--emit-placement", default=None, metavar="FILE",
        help="write the expert placement of this layout (--ep ranks, --redundant-experts copies from "
             "--routing-profile) as JSON for `moetier run --ep ... --placement FILE`")
    add("--what-if-plot", default=None, metavar="PNG",
        help="write the triangle's shares as one resource is scaled (see --what-if-scale)")
    add("--what-if-scale", default="hbm_bw", choices=("hbm_bw", "flops", "scale_up_bw", "scale_out_bw"),
        help="resource scaled 1x..32x for --what-if-plot (default hbm_bw)")


def wants_cluster(args: argparse.Namespace) -> bool:
    """True when ``moetier plan`` should hand over to the cluster planner."""
    if getattr(args, "devices", None) not in (None, 1):
        return True
    return any(getattr(args, f, None) not in (None, False) for f in _CLUSTER_FLAGS)


def fixed_from_args(args: argparse.Namespace) -> frozenset[str]:
    """The layout parameters the user set explicitly (a search keeps them)."""
    fixed = set()
    for flag, name in (("ep", "ep"), ("tp", "tp"), ("dp", "dp"), ("redundant_experts", "redundant_experts"),
                       ("batch_per_device", "batch")):
        if getattr(args, flag, None) is not None:
            fixed.add(name)
    if getattr(args, "no_overlap", False):
        fixed.add("two_batch_overlap")
    return frozenset(fixed)


def layout_from_args(args: argparse.Namespace, spec: ModelSpec, machine: Machine) -> Layout:
    devices = getattr(args, "devices", None) or 1
    phase = getattr(args, "phase", None) or "decode"
    batch = getattr(args, "batch_per_device", None)
    if batch is None:
        b = getattr(args, "batch", None)
        batch = float(b) if b not in (None, 1) else (64.0 if phase == "decode" else 16384.0)
    tp = getattr(args, "tp", None)
    dp = getattr(args, "dp", None)
    if tp is None and dp:
        if devices % dp:
            raise ClusterError(f"dp ({dp}) must divide devices ({devices})")
        tp = devices // dp
    ep = getattr(args, "ep", None)
    redundant = getattr(args, "redundant_experts", None)
    if (getattr(args, "search", False) and redundant is None and ep and spec.is_moe
            and ep > spec.num_experts):
        # --search with --ep above the expert count: start from the copies that fill one slot per device
        redundant = ep * math.ceil(spec.num_experts / ep) - spec.num_experts
    lay = Layout(
        devices=devices, phase=phase, ep=ep, dp=dp,
        tp=tp or 1, batch=batch, context=float(getattr(args, "context", 4096)),
        cached_fraction=getattr(args, "cached_fraction", 0.0) or 0.0,
        redundant_experts=redundant or 0,
        imbalance=getattr(args, "imbalance", None), routing_zipf=getattr(args, "zipf", 0.0) or 0.0,
        two_batch_overlap=not getattr(args, "no_overlap", False),
        dispatch_dtype=getattr(args, "dispatch_dtype", "fp8"), combine_dtype=getattr(args, "combine_dtype", "bf16"),
        kv_dtype=getattr(args, "kv_dtype", "bf16"), attention_dtype=getattr(args, "attention_dtype", "bf16") or "bf16",
        mtp_tokens=getattr(args, "mtp_tokens", 0) or 0,
        mtp_acceptance=getattr(args, "mtp_acceptance", 0.0) or 0.0, a2a=getattr(args, "a2a", "auto"),
    )
    lay = validate(lay, spec, machine)
    prof = getattr(args, "routing_profile", None)
    if prof and spec.is_moe and lay.ep > 1:
        loads = eplb.load_profile(prof)
        if loads.shape[-1] != spec.num_experts:
            raise ClusterError(f"--routing-profile {prof}: {loads.shape[-1]} experts, but {spec.name} has "
                               f"{spec.num_experts} routed experts per layer")
        lay = replace(lay, placement_imbalance=max(1.0, eplb.mean_imbalance(loads, lay.ep, lay.redundant_experts)))
    return lay


def replication_report(spec: ModelSpec, machine: Machine, lay: Layout, loads: Any, *, precision: str,
                       calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Per-device load and tokens/s without copies (static / packed) and with redundant experts."""
    rows = []
    red = lay.redundant_experts or lay.ep  # suggest one extra slot per device when none is given
    for label, r, packed in (("static placement, no copies", 0, False),
                             ("EPLB packing, no copies", 0, True),
                             (f"EPLB + {red} redundant experts", red, True)):
        imb = max(1.0, eplb.mean_imbalance(loads, lay.ep, r, packed=packed))
        res = plan_cluster(spec, machine, replace(lay, redundant_experts=r, placement_imbalance=imb, imbalance=None),
                           precision=precision, calibration=calibration)
        rows.append({"placement": label, "redundant_experts": r, "placement_imbalance": imb,
                     "imbalance": res.imbalance, "tokens_per_s_per_node": res.tokens_per_s_per_node,
                     "tokens_per_s_per_user": res.tokens_per_s_per_user, "bottleneck": res.bottleneck})
    return rows


def imbalance_cost(spec: ModelSpec, machine: Machine, r: ClusterResult, *, precision: str,
                   calibration: Calibration | None = None) -> ClusterResult | None:
    """The same layout with perfectly balanced expert load (to price the imbalance)."""
    if not spec.is_moe or r.imbalance <= 1.0 + 1e-9:
        return None
    return plan_cluster(spec, machine, replace(r.layout, imbalance=1.0), precision=precision,
                        calibration=calibration)


def _space_text(sr: Any) -> list[str]:
    out = ["search space (parameters you set are kept):"]
    for k, vals in sr.space.items():
        src = "set by you" if k in sr.fixed or (k == "tp" and "dp" in sr.fixed) else "searched"
        shown = ", ".join(("on" if v else "off") if isinstance(v, bool) else (fmt_count(v) if isinstance(v, float)
                          else str(v)) for v in vals)
        out.append(f"  {k:18s} {shown}  ({src})")
    return out


def emit_placement(spec: ModelSpec, lay: Layout, path: str, routing_profile: str | None) -> str:
    """Write the layout's expert placement (the runtime's ``moetier.ep_placement/1``): contiguous
    without copies, else EPLB replicate-and-pack over the routing profile summed over layers."""
    from moetier.distributed import placement as pl

    if not spec.is_moe:
        raise ClusterError(f"--emit-placement: {spec.name} has no routed experts")
    if lay.redundant_experts:
        if not routing_profile:
            raise ClusterError("--emit-placement with --redundant-experts needs --routing-profile FILE "
                               "(which experts are hot)")
        loads = pl.profile_loads(routing_profile)
        if loads.shape[-1] != spec.num_experts:
            raise ClusterError(f"--routing-profile {routing_profile}: {loads.shape[-1]} experts, but {spec.name} "
                               f"has {spec.num_experts}")
        placement = pl.from_profile(loads, lay.ep, lay.redundant_experts)
    else:
        placement = pl.contiguous(spec.num_experts, lay.ep)
    placement.save(path)
    return f"wrote the expert placement for {lay.ep} ranks ({lay.redundant_experts} redundant copies) to {path}"


def run_plan_command(args: argparse.Namespace) -> int:
    """``moetier plan MODEL --machine M --devices N ...``: the cluster planner's CLI entry."""
    from moetier.catalog import resolve_model
    from moetier.planner import whatif_cluster
    from moetier.planner.machines import get_machine

    if getattr(args, "published", False):
        return _run_published(args)
    spec = resolve_model(args.model)
    machine = get_machine(args.machine)
    precision = getattr(args, "precision", "fp8") or "fp8"
    lay = layout_from_args(args, spec, machine)
    as_json = bool(getattr(args, "json", False))
    explain = bool(getattr(args, "explain", False))
    doc: dict[str, Any] = {}
    text: list[str] = []
    emit = getattr(args, "emit_placement", None)
    if emit:
        doc["placement_file"] = emit
        text.append(emit_placement(spec, lay, emit, getattr(args, "routing_profile", None)))

    if getattr(args, "search", False):
        target = getattr(args, "target_tps_per_user", None)
        if target is None:
            raise ClusterError("--search needs --target-tps-per-user X")
        fixed = fixed_from_args(args)
        sr = search(spec, machine, lay, target, precision=precision, fixed=fixed)
        if explain:
            text += _space_text(sr)
        if sr.best is None:
            kept = ", ".join(f"{k} {getattr(lay, k)}" for k in sorted(fixed)) or "none"
            raise ClusterError(f"--search: no layout of {lay.devices} x {machine.name} reaches {target:g} "
                               f"tokens/s per user and fits ({sr.considered} layouts tried; kept: {kept})")
        doc["search"] = {"considered": sr.considered, "feasible": sr.feasible, "fixed": sorted(sr.fixed),
                         "space": {k: [v if isinstance(v, (int, float, bool)) else str(v) for v in vals]
                                   for k, vals in sr.space.items()},
                         "top": [t.to_json() for t in sr.top]}
        text.append(f"searched {sr.considered} layouts ({sr.feasible} meet {target:g} tok/s/user and fit); top:")
        text.append(f"  {'ep':>5s} {'dp':>5s} {'tp':>3s} {'copies':>6s} {'overlap':>7s} {'batch':>8s} "
                    f"{'tok/s/device':>12s} {'tok/s/node':>11s} {'tok/s/user':>10s}  bottleneck")
        for t in sr.top:
            tl = t.layout
            text.append(f"  {tl.ep:5d} {tl.dp:5d} {tl.tp:3d} {tl.redundant_experts:6d} "
                        f"{'on' if tl.two_batch_overlap else 'off':>7s} {fmt_count(tl.batch):>8s} "
                        f"{fmt_rate(t.tokens_per_s_per_device):>12s} {fmt_rate(t.tokens_per_s_per_node):>11s} "
                        f"{fmt_rate(t.tokens_per_s_per_user):>10s}  {t.bottleneck}")
        r = sr.best
        bl = r.layout
        text.append(f"chosen layout: ep {bl.ep}, dp {bl.dp}, tp {bl.tp}, {bl.redundant_experts} redundant experts, "
                    f"two-batch overlap {'on' if bl.two_batch_overlap else 'off'}, {_batch_text(bl)}")
        text.append("best:")
    else:
        r = plan_cluster(spec, machine, lay, precision=precision)
    doc.update(r.to_json())
    text += summary_lines(r)
    low = precision.strip().lower() if isinstance(precision, str) else precision.name  # a file's Precision
    if low.startswith("mixed:") and not any(f"{k}=" in low for k in ("default", "rest")):
        note = (f"--precision {precision}: groups not named are bf16 (the mixed: default); for an FP8 checkpoint "
                "add default=fp8")
        doc["notes"] = [*doc.get("notes", []), note]
        text.append(f"  note: {note}")
    bal = imbalance_cost(spec, machine, r, precision=precision)
    if bal is not None:
        cost = bal.tokens_per_s_per_node - r.tokens_per_s_per_node
        doc["imbalance_cost_tokens_per_s_per_node"] = cost
        text.append(f"  load imbalance {r.imbalance:.2f} costs {fmt_rate(cost)} tok/s per node "
                    f"({cost / bal.tokens_per_s_per_node:.1%}) vs perfectly balanced experts")
    prof = getattr(args, "routing_profile", None)
    zipf = getattr(args, "zipf", 0.0) or 0.0
    if spec.is_moe and r.layout.ep > 1 and (prof or zipf > 0) and getattr(args, "imbalance", None) is None:
        loads = eplb.load_profile(prof) if prof else eplb.zipf_loads(spec.num_experts, zipf)
        rep = replication_report(spec, machine, r.layout, loads, precision=precision)
        doc["replication"] = rep
        text.append("  expert placement (slowest device sets the step):")
        for row in rep:
            text.append(f"    {row['placement']:34s} max/mean {row['placement_imbalance']:.2f} "
                        f"(x noise -> {row['imbalance']:.2f})  {fmt_rate(row['tokens_per_s_per_node']):>10s} "
                        "tok/s/node")
    if explain:
        text += explain_lines(r)
    what_ifs = getattr(args, "what_if", None) or []
    if isinstance(what_ifs, str):
        what_ifs = [what_ifs]
    if what_ifs:
        changes = [c for w in what_ifs for c in (whatif_cluster.DEFAULT_CHAIN if w.strip() == "chain" else (w,))]
        steps = whatif_cluster.what_if_chain(spec, machine, r.layout, changes, precision=precision)
        doc["what_if"] = [{"change": s.label, **s.result.to_json()} for s in steps]
        text += ["", whatif_cluster.format_chain(steps)]
    plot = getattr(args, "what_if_plot", None)
    if plot:
        res = getattr(args, "what_if_scale", "hbm_bw")
        sweep = whatif_cluster.share_sweep(spec, machine, r.layout, res, precision=precision)
        p = whatif_cluster.plot_shares(sweep, plot, res)
        doc["what_if_plot"] = str(p)
        text.append(f"wrote {p}: shares of compute / memory / communication as {res} scales 1x..32x")
    if as_json:
        print(json.dumps(doc, indent=2, default=float))
    else:
        print("\n".join(text))
    return 0


def _run_published(args: argparse.Namespace) -> int:
    """``--published``: every published figure, in-sample and leave-one-chip-out, with its error."""
    from moetier.planner import published

    figs = published.load()
    val = published.shipped_validation()
    by_id = {f.id: f for f in figs}
    rows, text = [], []
    text.append(f"{len(figs)} published figures ({len({f.chip for f in figs})} chips); calibration: "
                f"{val.fitted.describe()}")
    text.append(f"  {'figure':34s} {'chip':>11s} {'published':>10s} {'predicted':>10s} {'error':>7s} "
                f"{'LOCO pred':>10s} {'LOCO err':>8s}  metric")
    for row in val.rows:
        f = by_id[row["id"]]
        mark = "" if f.fit else "  (not fitted: conditions inferred)"
        text.append(f"  {f.id:34s} {f.chip:>11s} {fmt_rate(f.value):>10s} {fmt_rate(row['in_sample']):>10s} "
                    f"{row['in_sample_error']:+7.1%} {fmt_rate(row['loco']):>10s} {row['loco_error']:+8.1%}  "
                    f"{f.metric}{mark}")
        rows.append({"figure": f.id, "chip": f.chip, "model": f.model, "regime": f.regime, "metric": f.metric,
                     "published": f.value, "predicted": row["in_sample"], "error": row["in_sample_error"],
                     "loco_predicted": row["loco"], "loco_error": row["loco_error"], "fitted": f.fit,
                     "conditions": f.conditions, "source": f.source, "confidence": f.confidence})
        if getattr(args, "explain", False):
            p = published.predict(f)
            text.append(f"    {f.regime}; {f.conditions}")
            text += ["    " + line for line in summary_lines(p.result) + explain_lines(p.result)]
            text.append("")
    text.append(f"in-sample: median |error| {val.in_sample_median:.1%}, worst {val.in_sample_max:.1%}; "
                f"leave-one-chip-out: median {val.loco_median:.1%}, worst {val.loco_max:.1%}, "
                f"RMS log error {val.loco_rms_log:.3f}")
    checks = ((val.in_sample_max <= 0.20, "in-sample every figure within 20%"),
              (val.loco_median <= 0.20, "leave-one-chip-out median within 20%"),
              (val.loco_max <= 0.35, "leave-one-chip-out every figure within 35%"))
    text.append("targets: " + "; ".join(f"{name} {'met' if ok else 'MISSED'}" for ok, name in checks))
    if getattr(args, "json", False):
        print(json.dumps({"published": rows, "calibration": val.fitted.describe(),
                          "in_sample_median_abs": val.in_sample_median, "in_sample_max_abs": val.in_sample_max,
                          "loco_median_abs": val.loco_median, "loco_max_abs": val.loco_max,
                          "loco_rms_log": val.loco_rms_log}, indent=2, default=float))
    else:
        print("\n".join(text))
    return 0
