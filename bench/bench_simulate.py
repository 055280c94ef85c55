"""Replay speed of the trace simulator: a synthetic Zipf trace of 1M token-layer rows.

    python bench/bench_simulate.py [--rows 1000000] [--repeats 5] [--policies lru,adaptive,belady]

Rows: ``--layers`` MoE layers x tokens, ``--experts`` experts, top-``--k`` without replacement
from a Zipf(``--zipf``) popularity with a per-layer random permutation. Per-layer caches of
25% of the experts. Reports the median wall time of ``--repeats`` replays per policy (trace
generation excluded) and writes bench/results/simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetier.traces.format import make_trace
from moetier.traces.simulate import simulate


def synthetic_trace(rows: int, experts: int, k: int, layers: int, zipf: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** zipf
    p /= p.sum()
    # top-k without replacement via Gumbel top-k on log-probabilities
    g = rng.gumbel(size=(rows, experts)) + np.log(p)[None, :]
    ids = np.argpartition(-g, k, axis=1)[:, :k].astype(np.int32)
    layer = np.tile(np.arange(layers, dtype=np.int32), rows // layers + 1)[:rows]
    perms = np.stack([rng.permutation(experts) for _ in range(layers)])
    ids = perms[layer[:, None], ids].astype(np.int32)
    return make_trace(topk_ids=ids, layer=layer, meta={"model": "synthetic-zipf", "num_experts": experts})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="lru,adaptive,belady")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "simulate.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    trace = synthetic_trace(a.rows, a.experts, a.k, a.layers, a.zipf)
    gen_s = time.perf_counter() - t0
    cap = a.experts // 4
    results = {}
    for name in a.policies.split(","):
        times, hit = [], None
        for _ in range(a.repeats):
            t = time.perf_counter()
            hit = simulate(trace, name, cap).hit_rate
            times.append(time.perf_counter() - t)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
                         "hit_rate": hit, "accesses_per_s": a.rows * a.k / statistics.median(times)}
        print(f"{name:>10}: median {statistics.median(times):.2f} s over {a.repeats} runs "
              f"({a.rows * a.k / statistics.median(times) / 1e6:.2f} M accesses/s), hit rate {hit:.3f}")
    out = {
        "bench": "simulate",
        "rows": a.rows, "experts": a.experts, "k": a.k, "layers": a.layers, "zipf": a.zipf,
        "cache_experts_per_layer": cap, "repeats": a.repeats, "trace_generation_s": gen_s,
        "target": "replay of 1M token-layer rows < 10 s",
        "results": results,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "command": "python bench/bench_simulate.py " + " ".join(sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
