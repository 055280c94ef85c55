"""Native GEMV kernel rates per weight format, ISA and thread count.

    python bench/bench_kernels.py [--rows 4096] [--cols 4096] [--threads 1,2] [--isas avx512,avx2,scalar]
                                  [--formats bf16,q4_k,...] [--seconds 0.3] [--out bench/results/kernels.json]

For each (format, ISA, threads): ``y = W x`` on a random ``rows x cols`` weight in the format's
stored layout (``moetier.native.rates``), best of 5 batches; reports stored GB/s and
Gweights/s. All rows of one run are measured side by side in the same process; on a shared
machine compare ratios within one table, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetier import native
from moetier.native.rates import FORMATS, measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--isas", default=None, help="comma list (default: every ISA this CPU runs, best first)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--seconds", type=float, default=0.3, help="timed seconds per measurement")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if native.library() is None:
        print(f"native kernels unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 2
    isas = a.isas.split(",") if a.isas else native.isas_supported()[::-1]
    threads = [int(t) for t in a.threads.split(",")]
    rows = []
    print(f"# y = W x, W {a.rows} x {a.cols}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| format | isa | threads | GB/s | Gweights/s | ms |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt in a.formats.split(","):
        for isa in isas:
            for t in threads:
                r = measure(fmt, isa, t, a.rows, a.cols, seconds=a.seconds)
                rows.append(dict(format=fmt, isa=r.isa, threads=t, gb_per_s=r.bytes_per_s / 1e9,
                                 gweights_per_s=r.weights_per_s / 1e9, ms=r.seconds * 1e3, bytes=r.nbytes))
                print(f"| {fmt} | {r.isa} | {t} | {r.bytes_per_s / 1e9:.2f} | {r.weights_per_s / 1e9:.2f} | "
                      f"{r.seconds * 1e3:.2f} |", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(rows=a.rows, cols=a.cols, results=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
