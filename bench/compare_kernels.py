"""Native GEMV kernels of two checkouts side by side: the same weight, alternating single calls.

    python bench/compare_kernels.py --base /work/main --formats q8_0,q4_k --isas avx512,avx2 [--rows 512 --cols 4096]
        [--group 32] (int4_group / int8_group)

The base checkout's library is built (or taken from the kernel cache) by a subprocess run
inside it; this checkout's by ``moetier.native``. Each (format, ISA): ``y = W x`` on a random
weight in the stored layout (``moetier.native.rates.random_weight``), both libraries called in
turn ``--calls`` times, the best single call of each kept (single short calls filter out a
loaded machine's preemptions). Prints Gweights/s of both, the ratio and max |dy| / max |y|.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from moetier import native
from moetier.native.rates import random_weight
from moetier.native.weights import describe


def library_of(checkout: str) -> ctypes.CDLL:
    code = "from moetier import native; native.library(); print(native._path)"
    p = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": checkout})
    return ctypes.CDLL(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout (e.g. main)")
    ap.add_argument("--formats", default="q8_0,q5_0,q4_k,q5_k,q6_k")
    ap.add_argument("--isas", default="avx512,avx2")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group", type=int, default=128, help="values per scale of int4_group / int8_group")
    ap.add_argument("--calls", type=int, default=60)
    a = ap.parse_args(argv)
    new = native.library()
    old = library_of(a.base)
    for fn in ("mt_gemv", "mt_set_isa"):
        getattr(old, fn).argtypes, getattr(old, fn).restype = getattr(new, fn).argtypes, getattr(new, fn).restype
    print("| format | isa | base Gweights/s | this Gweights/s | this / base | max abs dy / max abs y |")
    print("|---|---|---:|---:|---:|---:|")
    for f in a.formats.split(","):
        w = random_weight(f, a.rows, a.cols, group=a.group)
        d, x = describe(w), torch.randn(a.cols)
        ys = {"base": torch.empty(a.rows), "this": torch.empty(a.rows)}
        for isa in a.isas.split(","):
            code = native.ISAS.index(isa)
            if old.mt_set_isa(code) != 0 or new.mt_set_isa(code) != 0:
                print(f"| {f} | {isa} | not supported by this CPU |||")
                continue
            best = {"base": 1e9, "this": 1e9}
            for _ in range(a.calls):
                for name, lib in (("base", old), ("this", new)):
                    t = time.perf_counter()
                    lib.mt_gemv(ctypes.byref(d), None, 0, x.data_ptr(), ys[name].data_ptr(), a.threads)
                    best[name] = min(best[name], time.perf_counter() - t)
            rate = {k: a.rows * a.cols / v / 1e9 for k, v in best.items()}
            diff = ((ys["base"] - ys["this"]).abs().max() / ys["base"].abs().max()).item()
            print(f"| {f} | {isa} | {rate['base']:.2f} | {rate['this']:.2f} | {rate['this'] / rate['base']:.2f}x "
                  f"| {diff:.1e} |", flush=True)
    new.mt_set_isa(-1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
