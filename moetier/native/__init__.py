"""Native kernels (``csrc/*.c``, one shared library), compiled on first use and loaded with ctypes.

The shared library is built with the system C compiler (``cc``/``gcc``, ``-O3``; the weight
kernels ``csrc/fmt_*.c`` for the baseline ISA with ``-ffp-contract=off``, their AVX2 and
AVX-512 variants behind target attributes; every other file with ``-march=native``) into the
moetier cache directory (``~/.cache/moetier/native``, see ``planner.probe.cache_dir``), keyed
by a hash of the sources, the flags, the compiler version and the CPU's feature flags, so a
rebuild happens only when one of them changes. Building takes a few seconds.

``MOETIER_NATIVE=0`` turns the native path off (the torch path is then used for every
step). The weight kernels use the best instruction set the CPU has (``scalar`` < ``avx2`` <
``avx512``, see :func:`isa`); ``MOETIER_ISA=scalar|avx2|avx512`` forces one (an ISA the CPU
lacks makes the native path unavailable, with the reason). When no compiler is found or the
build fails, :func:`library` returns ``None`` and :func:`unavailable_reason` says why; the
runtime falls back to the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first: the kernels' OpenMP then resolves to it)

CSRC = Path(__file__).with_name("csrc")  # every *.c here is compiled into ONE shared library


def sources() -> list[Path]:
    """The C sources (``csrc/*.c``) and headers (``csrc/*.h``) of the native library."""
    return sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.h"))
FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-std=gnu11", "-fopenmp"]
NATIVE_FLAGS = ["-march=native"]  # glue code (attention, ops, ...): tuned for this CPU
KERNEL_FLAGS = ["-ffp-contract=off"]  # fmt_*.c: baseline ISA, explicit FMAs only (variants via target attributes)
LIBS = ["-lm"]
ISAS = ("scalar", "avx2", "avx512")  # MT_ISA_* order

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def enabled() -> bool:
    """False when ``MOETIER_NATIVE=0`` (or ``false``/``off``) is set."""
    return os.environ.get("MOETIER_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    from moetier.planner.probe import cache_dir as moetier_cache_dir

    return moetier_cache_dir() / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    srcs = sources()
    flags = FLAGS + NATIVE_FLAGS + KERNEL_FLAGS + LIBS
    for part in (*(p.name.encode() + p.read_bytes() for p in srcs), " ".join(flags).encode(),
                 version.encode(), _cpu_flags().encode()):
        key.update(part)
    out = cache_dir() / f"decode-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(dir=out.parent, prefix=".build-")
    try:
        objs, jobs = [], []
        for src in (p for p in srcs if p.suffix == ".c"):
            obj = os.path.join(tmpdir, src.stem + ".o")
            extra = KERNEL_FLAGS if src.name.startswith("fmt_") else NATIVE_FLAGS
            jobs.append((src, subprocess.Popen([cc, *FLAGS, *extra, "-I", str(CSRC), "-c", "-o", obj, str(src)],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            objs.append(obj)
        for src, job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"{cc} failed on {src}: {err.strip()[:2000]}")
        tmp = os.path.join(tmpdir, "lib.so")
        res = subprocess.run([cc, "-shared", "-fopenmp", "-o", tmp, *objs, *LIBS], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed linking {CSRC}: {res.stderr.strip()[:2000]}")
        os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    sigs = {
        "mt_scratch_new": (P, [L, L, L, L, L, L]),
        "mt_scratch_free": (None, [P]),
        "mt_attention": (I, [P, P, I, P, P, P, L, L, P, P, I]),
        "mt_route": (None, [P, P, I, P, P, I]),
        "mt_moe": (None, [P, P, I, P, I, P, P, P, P, I, I]),
        "mt_dense_mlp": (None, [P, P, I, P, I]),
        "mt_head": (None, [P, P, F, I, P, P, P, I]),
        "mt_embed": (None, [P, L, P]),
        "mt_gemv": (None, [P, P, I, P, P, I]),
        "mt_layers": (I, [P, I, P, I, P, P, P, P, L, P, P, P, P, P, L, P, I]),
        "mt_fmt_supported": (I, [I]),
        "mt_isa_supported": (I, [I]),
        "mt_get_isa": (I, []),
        "mt_set_isa": (I, [I]),
        "mt_dequant_rows": (I, [P, L, L, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; ``None`` if disabled or unavailable."""
    global _lib, _reason, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, RuntimeError, AttributeError) as e:
        _reason = f"native kernels unavailable: {e}"
        return None
    forced = os.environ.get("MOETIER_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS or lib.mt_set_isa(ISAS.index(forced)) != 0:
            ok = [n for i, n in enumerate(ISAS) if lib.mt_isa_supported(i)]
            _reason = f"MOETIER_ISA={forced}: not an instruction set this CPU runs (expected one of {', '.join(ok)})"
            return None
    _lib = lib
    return _lib


def isa() -> str | None:
    """The instruction set the weight kernels use (``scalar``/``avx2``/``avx512``), or ``None``
    when the native kernels are unavailable."""
    lib = library()
    return None if lib is None else ISAS[lib.mt_get_isa()]


def isas_supported() -> list[str]:
    """The instruction sets this CPU can run the weight kernels with (lowest first)."""
    lib = library()
    return [] if lib is None else [n for i, n in enumerate(ISAS) if lib.mt_isa_supported(i)]


def set_isa(name: str | None) -> None:
    """Force the weight kernels' instruction set (``None``: back to the best); for tests and
    benchmarks. Raises ``ValueError`` for an ISA this CPU does not run."""
    lib = library()
    if lib is None:
        raise RuntimeError(unavailable_reason() or "native kernels unavailable")
    if name is None:
        lib.mt_set_isa(-1)
    elif name not in ISAS or lib.mt_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"instruction set {name!r} is not supported here (supported: {', '.join(isas_supported())})")


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it did not)."""
    if not enabled():
        return "disabled by MOETIER_NATIVE=0"
    return _reason
