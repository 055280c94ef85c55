"""Speed of the cluster planner: a sweep of 1,000 DeepSeek-V3 layouts.

    python bench/bench_cluster_sweep.py [--layouts 1000] [--repeats 3]

Layouts: machines (h800, h100, gb200) x devices (8 .. 288) x ep (divisors of devices) x phase
(decode batches 16..256 requests, prefill batches 4K / 16K tokens) x routing (uniform, or Zipf 0.6
with 0 / 32 redundant experts placed by the EPLB algorithm) x two-batch overlap on/off, taken in
that order until ``--layouts`` valid layouts are collected. Every layout is planned end to end
(census shape cached, EPLB placement computed once per (profile, ep, redundancy) and cached).
Reports the median wall time of ``--repeats`` sweeps (the first includes the placements) and
the published-figure predictions, and writes bench/results/cluster_sweep.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetier.catalog import resolve_model
from moetier.planner import cluster
from moetier.planner import published as published_figures
from moetier.planner.calibration import DEFAULT
from moetier.planner.cluster import ClusterError, Layout, plan_cluster
from moetier.planner.machines import get_machine

RESULTS = Path(__file__).resolve().parent / "results"


def layouts(n: int, spec, machines):
    """Valid layouts per machine, interleaved round-robin until ``n`` are collected."""
    per: dict[str, list] = {}
    devs = (8, 16, 32, 64, 72, 128, 144, 256, 288)
    for mname, d in itertools.product(machines, devs):
        m = machines[mname]
        eps = [e for e in (8, 16, 32, 64, 72, 128, 144, 256, 288) if d % e == 0 and e <= d]
        for ep, (phase, batch), (zipf, red), tbo in itertools.product(
            eps,
            [("decode", b) for b in (16, 32, 64, 128, 256)] + [("prefill", b) for b in (4096, 16384)],
            [(0.0, 0), (0.6, 0), (0.6, 32)],
            (True, False),
        ):
            lay = Layout(devices=d, ep=ep, phase=phase, batch=float(batch), context=4096.0,
                         routing_zipf=zipf, redundant_experts=red, two_batch_overlap=tbo)
            try:
                cluster.validate(lay, spec, m)
            except ClusterError:
                continue
            per.setdefault(mname, []).append((m, lay))
    out = []
    for group in itertools.zip_longest(*per.values()):
        out.extend(x for x in group if x is not None)
    return out[:n]


def sweep(spec, items):
    results = []
    for m, lay in items:
        results.append(plan_cluster(spec, m, lay, precision="fp8"))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "cluster_sweep.json"))
    a = ap.parse_args()
    spec = resolve_model("deepseek-v3")
    machines = {n: get_machine(n) for n in ("h800", "h100", "gb200")}
    items = layouts(a.layouts, spec, machines)
    cluster._placement_imbalance.cache_clear()
    times = []
    res = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        res = sweep(spec, items)
        times.append(time.perf_counter() - t0)
    feas = [r for r in res if r.feasible]
    best = {}
    for r in feas:
        key = f"{r.machine}/{r.layout.phase}"
        if key not in best or r.tokens_per_s_per_node > best[key].tokens_per_s_per_node:
            best[key] = r
    bottlenecks = {}
    for r in res:
        bottlenecks[r.bottleneck] = bottlenecks.get(r.bottleneck, 0) + 1
    published = []
    for f in published_figures.load():
        p = published_figures.predict(f)
        published.append({"figure": f.id, "what": f.regime, "published": f.value, "metric": f.metric,
                          "predicted": round(p.value, 1), "error": round(p.error, 4),
                          "bottleneck": p.result.bottleneck if p.result else None})
    doc = {
        "benchmark": "cluster planner sweep, DeepSeek-V3 at FP8",
        "command": f"python bench/bench_cluster_sweep.py --layouts {a.layouts} --repeats {a.repeats}",
        "layouts": len(items),
        "repeats": a.repeats,
        "sweep_seconds": [round(t, 4) for t in times],
        "median_seconds": round(statistics.median(times), 4),
        "first_sweep_seconds_incl_placements": round(times[0], 4),
        "us_per_layout": round(statistics.median(times) / max(1, len(items)) * 1e6, 1),
        "budget_seconds": 10.0,
        "feasible_layouts": len(feas),
        "bottleneck_counts": bottlenecks,
        "best_per_machine_phase": {k: {"devices": r.layout.devices, "ep": r.layout.ep, "batch": r.layout.batch,
                                       "tokens_per_s_per_node": round(r.tokens_per_s_per_node, 1),
                                       "tokens_per_s_per_user": round(r.tokens_per_s_per_user, 2),
                                       "bottleneck": r.bottleneck} for k, r in sorted(best.items())},
        "calibration": DEFAULT.describe(),
        "published_figures": published,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(items)} layouts: median {doc['median_seconds']:.3f} s ({doc['us_per_layout']:.0f} us/layout), "
          f"first sweep incl. EPLB placements {times[0]:.3f} s; budget 10 s")
    for p in published:
        print(f"  {p['figure']:34s} published {p['published']:>9,.0f}  predicted "
              f"{p['predicted']:>9,.0f}  ({p['error']:+.1%}, {p['bottleneck']})")
    print(f"wrote {out}")
    return 0 if statistics.median(times) < 10.0 else 1


if __name__ == "__main__":
    sys.exit(main())
