"""Native kernels (``csrc/*.c``, one shared library), compiled on first use and loaded with ctypes.

The shared library is built with the system C compiler (``cc``/``gcc``, ``-O3
-march=native``) into the moetier cache directory (``~/.cache/moetier/native``, see ``planner.probe.cache_dir``), keyed
by a hash of the source, the flags, the compiler version and the CPU's feature flags, so a
rebuild happens only when one of them changes. Building takes about a second.

``MOETIER_NATIVE=0`` turns the native path off (the torch path is then used for every
step). When no compiler is found or the build fails, :func:`library` returns ``None`` and
:func:`unavailable_reason` says why; the runtime falls back to the torch path.
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
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11", "-fopenmp"]
LIBS = ["-lm"]

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
    for part in (*(p.name.encode() + p.read_bytes() for p in srcs), " ".join(FLAGS + LIBS).encode(),
                 version.encode(), _cpu_flags().encode()):
        key.update(part)
    out = cache_dir() / f"decode-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cfiles = [str(p) for p in srcs if p.suffix == ".c"]
        res = subprocess.run([cc, *FLAGS, "-I", str(CSRC), "-o", tmp, *cfiles, *LIBS], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {CSRC}: {res.stderr.strip()[:2000]}")
        os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    sigs = {
        "mt_scratch_new": (P, [L, L, L, L, L, L]),
        "mt_scratch_free": (None, [P]),
        "mt_attention": (I, [P, P, I, P, P, P, L, L, P, P, I]),
        "mt_route": (None, [P, P, I, P, P, I]),
        "mt_moe": (None, [P, P, I, P, I, P, P, P, I, I]),
        "mt_dense_mlp": (None, [P, P, I, P, I]),
        "mt_head": (None, [P, P, L, L, F, I, P, P, P, I]),
        "mt_embed": (None, [P, L, L, I, P]),
        "mt_gemv": (None, [P, P, I, P, P, L, L, I]),
        "mt_layers": (I, [P, I, P, I, P, P, P, P, L, P, P, P, P, L, P, I]),
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
    _lib = lib
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it did not)."""
    if not enabled():
        return "disabled by MOETIER_NATIVE=0"
    return _reason
