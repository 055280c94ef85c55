"""The probe's memory read figure, the old way and the new way, interleaved in one process.

    python -m bench.bench_probe_memory [--rounds 6] [--mib 256]

Per round: torch's sum over a float32 buffer (wall clock, best of 5: the probe before
2026-12-02) and ``planner.probe.measure_memory_bw`` (native readers, CPU time, best of 8 passes;
one core and all cores). Prints each round with the load average, then min / max / spread per
method: a figure the planner divides bytes by should not swing with other processes' load.
"""

from __future__ import annotations

import argparse
import os

from moetier.planner import probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--mib", type=int, default=256, help="buffer size (at least 8x the largest cache is used)")
    a = p.parse_args(argv)
    rows = []
    for i in range(a.rounds):
        t = probe.torch_sum_bw(a.mib * 2**20, 5)
        one, every = probe.measure_memory_bw(a.mib * 2**20, 8)
        rows.append((t, one, every))
        print(f"round {i}: torch sum {t / 1e9:.1f} GB/s | native one core {one / 1e9:.1f}, all cores "
              f"{every / 1e9:.1f} GB/s | load {os.getloadavg()[0]:.1f}", flush=True)
    for k, name in enumerate(("torch sum", "native one core", "native all cores")):
        v = [r[k] / 1e9 for r in rows]
        print(f"{name}: min {min(v):.1f} max {max(v):.1f} spread {max(v) / min(v):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
