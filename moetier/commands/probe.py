"""``moetier probe [--refresh] [--json]``: measure this computer (the ``cpu`` machine)."""

from __future__ import annotations

import argparse
import json

from moetier.planner import probe
from moetier.planner.machines import fmt_bytes, fmt_si


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="measure this computer: memory and disk bandwidth, cores, RAM, matmul FLOP/s",
        description="Measure this computer (cached in the user cache dir; MOETIER_CACHE_DIR overrides). "
        "The figures become the 'cpu' machine of `moetier plan --machine cpu`.",
    )
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    p.add_argument("--json", action="store_true", help="print the JSON record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rec, cached = probe.get_probe(refresh=args.refresh)
    if args.json:
        print(json.dumps({**rec, "from_cache": cached, "cache_path": str(probe.cache_path())}, indent=2))
        return 0
    where = "cached" if cached else f"measured in {rec['probe_seconds']:.1f} s"
    print(f"{probe.describe(rec)} ({where}; cache {probe.cache_path()}; --refresh re-measures)")
    rows = [
        ("cores", f"{rec.get('cores_usable')} usable / {rec.get('cores_logical')} logical"
                  f" / {rec.get('cores_physical') or '?'} physical"),
        ("RAM", f"{fmt_bytes(rec['ram_bytes'])} ({fmt_bytes(rec.get('ram_available_bytes'))} available)"),
        ("memory read", fmt_si(rec["memory_read_bw"], "B/s")
         + (f" all cores, {fmt_si(rec['memory_read_bw_per_core'], 'B/s')} one core"
            if rec.get("memory_read_bw_per_core") else "")
         + f" ({rec.get('memory_method', 'torch sum, wall clock')}"
         + (f"; {rec['memory_reader']}" if rec.get("memory_reader") else "") + ")"
         + _rounds(rec.get("memory_rounds"))),
        ("disk read", f"{fmt_si(rec['disk_read_bw'], 'B/s')} ({rec.get('disk_method')}, {rec.get('disk_dir')})"),
        ("disk free", fmt_bytes(rec["disk_free_bytes"])),
        ("matmul fp32", fmt_si(rec["matmul_flops"]["fp32"], "FLOP/s")),
        ("matmul bf16", fmt_si(rec["matmul_flops"]["bf16"], "FLOP/s")),
        ("kernels", ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in rec.get("kernel_rates", {}).items())
         + " weights/s (native decode GEMV)" if rec.get("kernel_rates") else "native kernels unavailable"),
    ]
    for k, v in rows:
        print(f"  {k:12s} {v}")
    return 0


def _rounds(rounds: list | None) -> str:
    """'; rounds one core 20.1-22.3, all cores 38.0-41.2 GB/s': how much the memory figure moved
    during the probe (the figures above are the best)."""
    if not rounds or len(rounds) < 2:
        return ""
    one, every = [r[0] / 1e9 for r in rounds], [r[1] / 1e9 for r in rounds]
    return (f"; rounds one core {min(one):.1f}-{max(one):.1f}, all cores {min(every):.1f}-{max(every):.1f} GB/s")
