"""``moetier doctor [--json]``: what this install will do on this machine, and what to fix.

Lists the C compiler, the CPU's features, the native kernels (built here if needed: their
library, the ISA the compiler targets with ``-march=native``, the weight kernels' run-time ISA,
or why they are unavailable), torch's version and thread settings, the cache directories (and
whether they can be written), and the versions of the optional dependencies, by extra. Problems
come last, one line each with the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MOETIER_NATIVE", "MOETIER_CACHE_DIR", "CC")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this install: compiler, native kernels, CPU, torch, caches, extras",
                       description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _cpu() -> dict[str, Any]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "Model", "CPU part") and model is None:
                model = v.strip()
            elif k in ("flags", "Features") and not flags:
                flags = set(v.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    return {"model": model or platform.processor() or None, "machine": platform.machine(),
            "cores_logical": os.cpu_count(), "cores_usable": usable,
            "features": [f for f in CPU_FEATURES if f in flags]}


def _writable(d: Path) -> bool:
    """Can files be created in ``d`` (or, if it does not exist yet, in its nearest existing parent)?"""
    while not d.exists() and d.parent != d:
        d = d.parent
    try:
        with tempfile.TemporaryFile(dir=d):
            return True
    except OSError:
        return False


def collect() -> dict[str, Any]:
    import torch

    import moetier
    from moetier import extras, native
    from moetier.planner import probe

    kernels = native.build_info()
    cache = probe.cache_dir()
    ext = extras.versions()
    problems = []
    if not kernels["enabled"]:
        problems.append("native kernels turned off by MOETIER_NATIVE=0: decoding takes the slower torch path")
    elif not kernels["available"]:
        problems.append(f"native kernels unavailable ({kernels['unavailable_reason']}): decoding takes the slower "
                        f"torch path; fix: {native.FIX}")
    if kernels["cache_fallback"]:
        problems.append(f"kernel cache {kernels['cache_dir']} not writable ({kernels['cache_fallback']['why']}): "
                        "kernels are rebuilt in a temporary directory; fix: set MOETIER_CACHE_DIR to a writable dir")
    for name, dists in ext.items():
        missing = [d for d, v in dists.items() if v is None]
        if missing:
            problems.append(f"extra '{name}' not installed (missing {', '.join(missing)}): "
                            f"pip install 'moetier[{name}]'")
    return {
        "moetier": {"version": moetier.__version__, "location": str(Path(moetier.__file__).parent)},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "cpu": _cpu(),
        "native": kernels,
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads(),
                  "interop_threads": torch.get_num_interop_threads(),
                  "env": {k: os.environ.get(k) for k in THREAD_ENV}},
        "cache": {"dir": str(cache), "writable": _writable(cache), "probe": str(probe.cache_path()),
                  "probe_cached": probe.cache_path().exists(), "native_dir": kernels["cache_dir"],
                  "native_fallback": kernels["cache_fallback"]},
        "extras": ext,
        "problems": problems,
    }


def _text(d: dict[str, Any]) -> list[str]:
    n, t, c, cpu = d["native"], d["torch"], d["cache"], d["cpu"]
    if n["available"]:
        kern = f"built ({n['dispatch']} path) {n['library']}"
    else:
        kern = f"UNAVAILABLE: {n['unavailable_reason']} (torch path)"
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items() if v is not None) or "none set"
    rows = [
        ("moetier", f"{d['moetier']['version']} at {d['moetier']['location']}"),
        ("python", f"{d['python']['version']} {d['python']['executable']}"),
        ("cpu", f"{cpu['model']} ({cpu['machine']}), {cpu['cores_usable']}/{cpu['cores_logical']} cores usable"),
        ("cpu features", " ".join(cpu["features"]) or "-"),
        ("compiler", f"{n['compiler']} ({n['compiler_version']})" if n["compiler"] else "NONE on PATH"),
        ("compiled isa", " ".join(n["isa"]) or "-"),
        ("kernels", kern),
        ("kernel isas", (" ".join(n["isas_supported"]) + " (this CPU runs; MOETIER_ISA forces one)")
         if n["isas_supported"] else "-"),
        ("sources", f"{', '.join(n['sources'])} (flags {' '.join(n['flags'])})"),
        ("torch", f"{t['version']}, {t['threads']} threads ({t['interop_threads']} inter-op); env: {env}"),
        ("cache", f"{c['dir']} ({'writable' if c['writable'] else 'NOT writable'})"),
        ("kernel cache", n["cache_fallback"]["dir"] + " (fallback)" if n["cache_fallback"] else c["native_dir"]),
        ("probe", f"{c['probe']} ({'cached' if c['probe_cached'] else 'not measured yet: moetier probe'})"),
    ]
    for extra, dists in d["extras"].items():
        rows.append((f"extra {extra}", ", ".join(f"{k} {v or 'MISSING'}" for k, v in dists.items())))
    out = [f"{k:13s} {v}" for k, v in rows]
    out += [""] + ([f"problem: {p}" for p in d["problems"]] or ["no problems found"])
    if n["compiler_output"]:
        out += ["", "compiler output:", n["compiler_output"].rstrip()]
    return out


def run(args: argparse.Namespace) -> int:
    d = collect()
    print(json.dumps(d, indent=2) if args.json else "\n".join(_text(d)))
    return 0
