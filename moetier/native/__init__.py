"""Native kernels (``csrc/*.c``, one shared library), compiled on first use and loaded with ctypes.

The shared library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``;
``-O3``; the weight kernels ``csrc/fmt_*.c`` for the baseline ISA with ``-ffp-contract=off``, their
AVX2, AVX-512 and AVX-512 VNNI variants behind target attributes; every other file with ``-march=native``) into
the kernel cache (``<moetier cache>/native``, see
``planner.probe.cache_dir``), keyed by a hash of the sources, the flags, the compiler version and
the CPU's feature flags, so a rebuild happens only when one of them changes. Building takes about a
second. The cache is safe to share: each build writes a private temporary file and renames it into
place (two processes compiling at once both succeed; the last rename wins with identical bytes), and
a cache directory that cannot be written (read-only home, full disk) falls back to a private
temporary directory, said once on stderr. A library already in a read-only cache is used as is.

``MOETIER_NATIVE=0`` turns the native path off (the torch path is then used for every step). When
no compiler is found or the build fails, :func:`library` returns ``None``, prints one warning line
(what was not built, that decoding takes the slower torch path, how to fix it) and
:func:`unavailable_reason` says why; the runtime falls back to the torch path. :func:`build_info`
(used by ``moetier doctor``) reports the compiler, the ISA it targets and the library's path.

The weight kernels use the best instruction set the CPU has (``scalar`` < ``avx2`` < ``avx512`` <
``avx512vnni`` < ``avx512bf16``, see :func:`isa`; at ``avx512vnni`` the integer-weight formats that have
kernels for it compute their dot products in integer arithmetic on x split into int8 digits, the
others run their ``avx512`` kernels; at ``avx512bf16`` bf16 weights use ``vdpbf16ps``, every other
format its ``avx512vnni`` kernels); ``MOETIER_ISA=scalar|avx2|avx512|avx512vnni|avx512bf16`` forces one
(an ISA the CPU lacks makes the native path unavailable, with the reason). bf16 weights multiply
activations rounded to bf16 on every ISA (as torch's and llama.cpp's bf16 products do).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (loads torch's libgomp first: the kernels' OpenMP then resolves to it)

CSRC = Path(__file__).with_name("csrc")  # every *.c here is compiled into ONE shared library


def sources() -> list[Path]:
    """The C sources (``csrc/*.c``) and headers (``csrc/*.h``) of the native library."""
    return sorted(CSRC.glob("*.c")) + sorted(CSRC.glob("*.h"))


FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-std=gnu11", "-fopenmp"]
NATIVE_FLAGS = ["-march=native"]  # glue code (attention, ops, ...): tuned for this CPU
KERNEL_FLAGS = ["-ffp-contract=off"]  # fmt_*.c: baseline ISA, explicit FMAs only (variants via target attributes)
LIBS = ["-lm"]
ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "avx512bf16")  # MT_ISA_* order
FIX = "apt-get install gcc (or dnf install gcc / xcode-select --install), or set CC to a working C compiler"

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False
_path: Path | None = None  # the loaded library file
_log: str | None = None  # the failed build's full compiler output
_fallback: tuple[Path, str] | None = None  # (temporary dir used, why the cache dir was not)


def enabled() -> bool:
    """False when ``MOETIER_NATIVE=0`` (or ``false``/``off``) is set."""
    return os.environ.get("MOETIER_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where built libraries are kept (``<moetier cache>/native``); see :func:`_writable_dir`."""
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


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _key(cc: str) -> str:
    """Hash of what the library depends on: sources, flags, compiler version, CPU features."""
    key = hashlib.sha256()
    flags = " ".join(FLAGS + NATIVE_FLAGS + KERNEL_FLAGS + LIBS)
    for part in (*(p.name.encode() + p.read_bytes() for p in sources()), flags.encode(),
                 _compiler_version(cc).encode(), _cpu_flags().encode()):
        key.update(part)
    return key.hexdigest()[:16]


def _private_tmp_dir() -> Path:
    """``$TMPDIR/moetier-<uid>/native``, mode 0700 and ours; a fresh ``mkdtemp`` if that is not safe
    (another user could otherwise plant a library there)."""
    base = Path(tempfile.gettempdir()) / f"moetier-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
            d = base / "native"
            d.mkdir(mode=0o700, exist_ok=True)
            return d
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="moetier-native-"))


def _writable_dir() -> Path:
    """The kernel cache dir if we can create files in it, else a private temp dir (said once)."""
    global _fallback
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
        return d
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    tmp = _private_tmp_dir()
    if _fallback is None:
        print(f"moetier: note: kernel cache {d} is not writable ({why}); building native kernels in {tmp} "
              "(set MOETIER_CACHE_DIR to a writable directory to keep them)", file=sys.stderr, flush=True)
    _fallback = (tmp, why)
    return tmp


def _build(cc: str, force: bool = False) -> Path:
    """The library for this compiler and CPU: from the cache, else (or if ``force``) compiled and renamed into it."""
    global _log
    if not any(p.suffix == ".c" for p in sources()):
        raise RuntimeError(f"no C sources in {CSRC} (an incomplete install: reinstall moetier)")
    name = f"decode-{_key(cc)}.so"
    cached = cache_dir() / name
    if cached.exists() and not force:  # also when the cache is read-only
        return cached
    d = _writable_dir()
    out = d / name
    if out.exists() and not force:
        return out
    tmpdir = tempfile.mkdtemp(dir=d, prefix=f".{name}.")  # private: builders never share a file
    try:
        objs, jobs = [], []
        for src in (p for p in sources() if p.suffix == ".c"):
            obj = os.path.join(tmpdir, src.stem + ".o")
            extra = KERNEL_FLAGS if src.name.startswith("fmt_") else NATIVE_FLAGS
            try:
                jobs.append((src, subprocess.Popen([cc, *FLAGS, *extra, "-I", str(CSRC), "-c", "-o", obj, str(src)],
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            except OSError as e:
                raise RuntimeError(f"{cc} failed on {src}: {e}") from e
            objs.append(obj)
        errors = []
        for src, job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                errors.append((src, job.returncode, err))
        tmp = os.path.join(tmpdir, "lib.so")
        if not errors:
            res = subprocess.run([cc, "-shared", "-fopenmp", "-o", tmp, *objs, *LIBS], capture_output=True,
                                 text=True, check=False)
            if res.returncode != 0:
                errors.append((CSRC, res.returncode, res.stderr))
        if errors:
            src, rc, err = errors[0]
            _log = "\n".join(e for _, _, e in errors)
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
            raise RuntimeError(f"{cc} failed on {src} (exit {rc})" + (f": {first[:300]}" if first else ""))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a concurrent builder's rename leaves an identical complete file
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
        "mt_moe_rows": (None, [P, P, I, I, P, P, P, I, P, I]),
        "mt_moe_add": (None, [P, P, P, I, P, P, I]),
        "mt_dense_mlp": (None, [P, P, I, P, I]),
        "mt_head": (None, [P, P, F, I, P, P, P, I]),
        "mt_embed": (None, [P, L, P]),
        "mt_gemv": (None, [P, P, I, P, P, I]),
        "mt_layers": (I, [P, I, P, I, P, P, P, P, L, P, P, P, P, P, L, P, I]),
        "mt_step": (I, [P, L, L, P, I]),
        "mt_fmt_supported": (I, [I]),
        "mt_fmt_isa": (I, [I, I]),
        "mt_isa_supported": (I, [I]),
        "mt_get_isa": (I, []),
        "mt_set_isa": (I, [I]),
        "mt_dequant_rows": (I, [P, L, L, P]),
        "mt_read_bw": (ctypes.c_uint64, [P, L, I, I, I, P, P]),
        "mt_ep_serve": (L, [P, P, I, P, I, P, P, P, L, I]),
        "mt_ep_head": (I, [P, P, F, I, P, P, P, I]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _warn(reason: str) -> None:
    """One line on stderr: what was not built, what it costs, how to fix it."""
    print(f"moetier: warning: native kernels ({CSRC.name}/*.c) not built: {reason}; decoding takes the torch "
          f"path (2-8x slower); fix: {FIX} (`moetier doctor` shows details)",
          file=sys.stderr, flush=True)


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them if needed; ``None`` if disabled or unavailable (warned once)."""
    global _lib, _reason, _tried, _path
    if not enabled():
        return None
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (cc, gcc or clang) on PATH"
        _warn(_reason)
        return None
    try:
        path = _build(cc)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged file in the cache (e.g. copied half-way): build it again over it
            path = _build(cc, force=True)
            lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, RuntimeError, AttributeError) as e:
        _reason = f"native kernels unavailable: {e}"
        _warn(str(e))
        return None
    forced = os.environ.get("MOETIER_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS or lib.mt_set_isa(ISAS.index(forced)) != 0:
            ok = [n for i, n in enumerate(ISAS) if lib.mt_isa_supported(i)]
            _reason = f"MOETIER_ISA={forced}: not an instruction set this CPU runs (expected one of {', '.join(ok)})"
            return None
    _lib, _path = lib, path
    return _lib


def isa() -> str | None:
    """The instruction set the weight kernels use (one of :data:`ISAS`), or ``None``
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


ISA_MACROS = ("__AVX512F__", "__AVX512BW__", "__AVX512BF16__", "__AVX512VNNI__", "__AMX_TILE__", "__AMX_BF16__",
              "__AVX2__", "__FMA__", "__F16C__", "__ARM_NEON", "__ARM_FEATURE_SVE")


def compiled_isa(cc: str) -> list[str]:
    """The ISA extensions ``cc`` targets with our ``-m`` flags (``-march=native``): its predefined macros."""
    arch = [f for f in FLAGS + NATIVE_FLAGS if f.startswith("-m")]
    try:
        res = subprocess.run([cc, *arch, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                             check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    defined = {ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("#define ")}
    return [m.strip("_").lower() for m in ISA_MACROS if m in defined]


def build_info() -> dict[str, Any]:
    """What ``moetier doctor`` shows about the native kernels (builds them if needed)."""
    cc = _compiler()
    lib = library()
    isa = compiled_isa(cc) if cc else []
    isa_now = ISAS[lib.mt_get_isa()] if lib is not None else None
    return {
        "enabled": enabled(),
        "compiler": shutil.which(cc) if cc else None,
        "compiler_version": (_compiler_version(cc).splitlines() or [""])[0] if cc else None,
        "flags": FLAGS + NATIVE_FLAGS + LIBS,
        "kernel_flags": FLAGS + KERNEL_FLAGS,
        "isas_supported": isas_supported() if lib is not None else [],
        "sources": [p.name for p in sources()],
        "isa": isa,
        "dispatch": isa_now if lib is not None else None,  # the weight kernels' ISA, chosen at run time
        "library": str(_path) if lib is not None and _path else None,
        "cache_dir": str(cache_dir()),
        "cache_fallback": {"dir": str(_fallback[0]), "why": _fallback[1]} if _fallback else None,
        "available": lib is not None,
        "unavailable_reason": unavailable_reason(),
        "compiler_output": _log,
    }
