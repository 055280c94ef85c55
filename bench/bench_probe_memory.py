"""The probe's memory read figure against what the decode kernels stream, interleaved in one process.

    python -m bench.bench_probe_memory [--rounds 6] [--mib 256] [--passes 8]
                                       [--formats bf16,int8_group,fp8_e4m3_block] [--rows 16384 --cols 4096]

Per round, over one pre-touched buffer of at least 8x the largest cache, best of ``--passes``
passes in the readers' CPU time, one core and all cores:

* ``torch sum``: torch's sum, wall clock, best of 5 (the probe before 2026-12-02; all cores),
* ``1 stream avx2``: the native reader forced to AVX2 loads and one stream per thread (the probe
  of 2026-12-02, ``csrc/membw.c`` before 2026-12-03: same loads in the same order),
* ``probe``: the reader as ``moetier probe`` runs it now (the weight kernels' instruction set,
  ``planner.probe.READ_STREAMS`` streams per thread),

then each format's decode GEMV ``y = W x`` on a ``rows x cols`` weight (``native.rates.measure``,
best of 5 batches): one thread in its CPU time (as the probe's one-core figure), all threads by
wall clock. Prints each round with the load average, then the medians and the kernel / probe
ratios (a ratio above 1: the kernel streams faster than the bound the planner divides by).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from moetier import native
from moetier.planner import probe


def readers(buf, threads: int, passes: int) -> dict[str, float]:
    """bytes/s, best pass: the old reader (AVX2, one stream) and the probe's, one core and all cores."""
    out = {}
    for name, isa, streams in (("1 stream avx2", "avx2", 1), ("probe", None, probe.READ_STREAMS)):
        native.set_isa(isa)
        try:
            for t in sorted({1, threads}):
                cpu, _, b = probe.read_passes(buf, t, passes, streams)
                out[f"{name}, {t}T"] = probe.best_rates(b, cpu)
        finally:
            native.set_isa(None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--mib", type=int, default=256, help="buffer size (at least 8x the largest cache is used)")
    p.add_argument("--passes", type=int, default=8, help="reader passes per round (best kept)")
    p.add_argument("--formats", default="bf16,int8_group,fp8_e4m3_block", help="kernels to compare ('' for none)")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=4096)
    a = p.parse_args(argv)
    if native.library() is None:
        print(f"native kernels unavailable: {native.unavailable_reason()}")
        return 2
    from moetier.native.rates import measure

    threads = probe.usable_cores()
    formats = [f for f in a.formats.split(",") if f]
    buf = probe.read_buffer(probe.memory_buffer_bytes(a.mib * 2**20))
    probe.read_passes(buf, 1, 1)  # warm-up
    print(f"# buffer {buf.numel() * 8 / 2**20:.0f} MiB, {threads} usable cores, kernels' ISA {native.isa()}, "
          f"weights {a.rows} x {a.cols}; GB/s")
    rows: list[dict[str, float]] = []
    for i in range(a.rounds):
        r = {f"torch sum, {threads}T": probe.torch_sum_bw(a.mib * 2**20, 5)}
        r.update(readers(buf, threads, a.passes))
        for f in formats:
            r[f"{f}, 1T cpu"] = measure(f, None, 1, a.rows, a.cols, clock=time.thread_time).bytes_per_s
            if threads > 1:
                r[f"{f}, {threads}T wall"] = measure(f, None, threads, a.rows, a.cols).bytes_per_s
        rows.append(r)
        print(f"round {i} (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in med.items()))
    for f in formats:
        for t, clock in sorted({(1, "cpu"), (threads, "wall")}):
            k = med[f"{f}, {t}T {clock}"]
            print(f"{f} {t}T ({clock}) / probe: before {k / med[f'1 stream avx2, {t}T']:.2f}, "
                  f"now {k / med[f'probe, {t}T']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
