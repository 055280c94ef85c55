"""Measure this computer: the ``cpu`` machine (``moetier probe``).

``probe(...) -> dict`` measures, in a few seconds:

* memory read bandwidth, one core and all cores (:class:`MemoryReaders`: native readers stream
  a buffer of at least 8x the largest cache the way the decode kernels read weights, with the
  vector loads of the kernels' instruction set, each thread's slice as ``READ_STREAMS``
  sequential streams side by side; each pass timed in the readers' CPU time; the best pass of
  ``MEMORY_ROUNDS`` rounds spread over the probe (at its start, after the disk, at its end), so
  a moment of other traffic on the memory bus does not set the figure; torch's wall-clock sum
  without the native library),
* disk read bandwidth with ``O_DIRECT`` on a temporary file written in the cache dir (so the
  page cache is bypassed; falls back to ``posix_fadvise(DONTNEED)`` where O_DIRECT is not
  supported, and says so in ``disk_method``), read with the expert store's pattern (shuffled
  expert-sized blocks, two readers each with aligned chunks in flight; in the caller's cgroup,
  like the tiered store),
* cores, RAM, free disk space,
* dense matmul FLOP/s in fp32 and bf16 through torch,
* the native decode kernels' rate per stored format (weights/s of ``y = W x`` at all usable
  cores, a cache-resident weight: ``native.rates.planner_rates``; empty when the native
  library is unavailable; one core's rate in its CPU time, best of 3 interleaved rounds after a
  warm-up, times the usable cores): the planner's decode bound adds the kernel time to the
  memory time, since the same cores stream and compute.

Results are cached as JSON with a timestamp in the user cache dir:
``$MOETIER_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/moetier``, else ``~/.cache/moetier``
(file ``probe.json``). ``cpu_machine(refresh=False)`` turns the cached figures into a
:class:`Machine` with tiers ``dram -> ssd`` (compute in dram) and efficiency 1.0 everywhere,
because the figures are already sustained measurements.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetier.errors import MoetierError
from moetier.planner.hardware import Efficiency, Machine, MemoryTier
from moetier.weights.store import DEFAULT_IO_DEPTH, DEFAULT_IO_THREADS, read_aligned

PROBE_VERSION = 4  # 2: disk read with the store's pattern (read_aligned, shuffled blocks); 3: its readers;
# 4: memory read with the kernels' loads, several streams per thread, rounds spread over the probe
KERNEL_RATES_METHOD = "1-thread CPU time x cores, GGUF types"  # native.rates.planner_rates; older records re-probe
MEMORY_ROUNDS = 3  # the probe's memory rounds: at its start, after the disk, at its end
MEMORY_METHOD = f"native stream, CPU time, best pass of {MEMORY_ROUNDS} rounds"  # records without a method re-probe
STALE_SECONDS = 7 * 86400  # a cached probe older than this is measured again
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per usable core above which a probe is "under load"


@dataclass(frozen=True)
class ProbeSizes:
    """Work sizes; the defaults keep a probe under ~20 s on a small machine."""

    mem_bytes: int = 256 * 2**20
    mem_repeats: int = 8  # passes per thread setting (best kept), after one warm-up pass
    disk_bytes: int = 256 * 2**20
    disk_block: int = 8 * 2**20
    matmul_n: int = 1024
    matmul_seconds: float = 0.5
    kernel_n: int = 1024  # native kernel rates: an n x n weight per format
    kernel_seconds: float = 0.3  # per format, spread over 3 interleaved rounds (best kept)


def cache_dir() -> Path:
    env = os.environ.get("MOETIER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moetier"


def cache_path() -> Path:
    return cache_dir() / "probe.json"


# --------------------------------------------------------------------------------------
# measurements


def llc_bytes() -> int:
    """The largest CPU cache (bytes) the OS reports (sysfs; 0 where unknown)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            t = f.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
            best = max(best, int(t.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best


def memory_buffer_bytes(min_bytes: int) -> int:
    """How much a bandwidth probe reads: ``min_bytes``, and at least 8x the largest cache (so
    the passes stream from DRAM, not from a cache that kept the previous pass)."""
    return max(int(min_bytes), 8 * llc_bytes())


def torch_sum_bw(nbytes: int, repeats: int) -> float:
    """bytes/s of the best of ``repeats`` wall-clock torch sums over ``nbytes`` of float32 (the
    fallback without the native library)."""
    import torch

    n = max(1, nbytes // 4)
    x = torch.ones(n, dtype=torch.float32)
    x.sum()  # warm: page in
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n * 4 / max(best, 1e-9)


def best_rates(nbytes: int, cpu: list[list[float]]) -> float:
    """bytes/s of the best pass: ``cpu[t][p]`` = thread t's CPU seconds for pass p over its slice
    (``nbytes`` over all threads); a pass lasts as long as its slowest thread."""
    passes = min(len(c) for c in cpu)
    return max(nbytes / max(max(c[p] for c in cpu), 1e-9) for p in range(passes))


READ_STREAMS = 4  # sequential streams per reader thread (membw.c); why: bench/README.md, the probe's memory figure


def read_isa() -> str | None:
    """The loads the memory readers use: the weight kernels' instruction set (``native.isa()``;
    at ``avx512vnni`` / ``avx512bf16`` the AVX-512 loads), None without the native library."""
    from moetier import native

    isa = native.isa()
    return "avx512" if isa in ("avx512vnni", "avx512bf16") else isa


def read_buffer(nbytes: int) -> Any:
    """A written (paged-in) int64 buffer of ``nbytes // 8`` words with a known sum: what the
    memory readers stream."""
    import torch

    return torch.arange(max(8, nbytes // 8), dtype=torch.int64)


def read_passes(buf: Any, threads: int, passes: int,
                streams: int = READ_STREAMS) -> tuple[list[list[float]], list[list[float]], int]:
    """Stream ``buf`` (an int64 tensor from :func:`read_buffer`, or a byte count: a fresh one)
    ``passes`` times on ``threads`` threads at once (native ``mt_read_bw``: each thread reads its
    slice as ``streams`` sequential streams with the loads of the weight kernels' instruction
    set, ``native.isa()``): per thread and pass (CPU seconds, wall seconds), and the bytes read
    per pass. Raises ``RuntimeError`` when the native library is unavailable or the readers' word
    sum is not the buffer's (not every byte was read)."""
    import torch

    from moetier import native

    lib = native.library()
    if lib is None:
        raise RuntimeError(native.unavailable_reason() or "native kernels unavailable")
    if isinstance(buf, int):
        buf = read_buffer(buf)
    threads, passes = max(1, threads), max(1, passes)
    words = buf.numel()
    cpu = torch.zeros(threads * passes, dtype=torch.float64)
    wall = torch.zeros(threads * passes, dtype=torch.float64)
    got = lib.mt_read_bw(buf.data_ptr(), words, threads, streams, passes, cpu.data_ptr(), wall.data_ptr())
    want = int(buf.sum()) * passes % 2**64
    if got != want:
        raise RuntimeError(f"memory probe: the readers summed {got}, expected {want} (not every byte was read)")
    c, w = cpu.view(threads, passes).tolist(), wall.view(threads, passes).tolist()
    return c, w, words * 8


class MemoryReaders:
    """The memory read figures ``(one core, all cores)``, measured in rounds over one buffer of
    ``memory_buffer_bytes(nbytes)``: :meth:`round` reads it ``passes`` times on one thread, then
    on ``threads`` at once; :meth:`rates` keeps the best pass of all rounds. The probe spreads its
    rounds over its other measurements, so one moment of another process's (or VM's) traffic on
    the memory bus does not set the figure the planner keeps for a week."""

    def __init__(self, nbytes: int, threads: int | None = None):
        self.threads = threads if threads is not None else usable_cores()
        self.buf = read_buffer(memory_buffer_bytes(nbytes))
        read_passes(self.buf, 1, 1)  # warm-up, not kept: TLB, clocks, the prefetchers
        self.one = self.every = 0.0
        self.rounds: list[tuple[float, float]] = []

    def round(self, passes: int) -> None:
        cpu1, _, b = read_passes(self.buf, 1, passes)
        one = best_rates(b, cpu1)
        every = one
        if self.threads > 1:
            cpun, _, b = read_passes(self.buf, self.threads, passes)
            every = best_rates(b, cpun)
        self.rounds.append((one, every))
        self.one, self.every = max(self.one, one), max(self.every, every)

    def rates(self) -> tuple[float, float]:
        return self.one, self.every


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def measure_memory_bw(nbytes: int, repeats: int, threads: int | None = None, rounds: int = 1) -> tuple[float, float]:
    """Sustained memory read bandwidth (bytes/s), ``(one core, all cores)``: the best of ``repeats``
    passes (in ``rounds`` back-to-back rounds, after one warm-up pass) over a buffer of
    ``memory_buffer_bytes(nbytes)``, read the way the decode kernels read their weights
    (sequential streams, the kernels' vector loads: ``read_passes``) on one thread, then on
    ``threads`` (default: the usable cores) at once, each pass timed in the readers' CPU time
    (like the kernel rates of ``native.rates.planner_rates``: time the OS gives other processes
    does not count). Why: a wall-clock torch sum read 27-47 GB/s on the shared 2-core VM over one
    day. ``probe`` spreads its rounds over its other measurements (:class:`MemoryReaders`)."""
    threads = usable_cores() if threads is None else threads
    from moetier import native

    if native.library() is None:  # no native readers: torch's sum, wall clock (all cores)
        bw = torch_sum_bw(nbytes, repeats)
        return bw / max(1, threads), bw
    m = MemoryReaders(nbytes, threads)
    for _ in range(max(1, rounds)):
        m.round(-(-max(1, repeats) // max(1, rounds)))
    return m.rates()


def measure_disk_bw(directory: Path, nbytes: int, block: int) -> tuple[float, str]:
    """Read bandwidth (bytes/s) of a fresh temp file, page cache bypassed, read the way the tiered
    provider reads experts: ``block``-sized ranges in shuffled order, ``DEFAULT_IO_THREADS`` of
    them at once, each as up to ``DEFAULT_IO_DEPTH`` aligned chunks in flight (``read_aligned``)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = max(4096, block - block % 4096)
    nbytes = max(block, nbytes - nbytes % block)
    fd, name = tempfile.mkstemp(prefix="probe-", suffix=".bin", dir=directory)
    try:
        chunk = os.urandom(min(block, 1 << 20)) * (block // min(block, 1 << 20))
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // block):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        bufs = [mmap.mmap(-1, block) for _ in range(DEFAULT_IO_THREADS)]  # page-aligned, as O_DIRECT requires
        buf = bufs[0]
        method = "fadvise-DONTNEED"
        rfd = -1
        if getattr(os, "O_DIRECT", 0):
            try:
                rfd = os.open(name, os.O_RDONLY | os.O_DIRECT)
                os.preadv(rfd, [buf], 0)  # some filesystems (tmpfs) refuse O_DIRECT reads
                method = "O_DIRECT"
            except OSError:
                if rfd >= 0:
                    os.close(rfd)
                rfd = -1
        if rfd < 0:
            rfd = os.open(name, os.O_RDONLY)
        try:
            if method != "O_DIRECT" and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            # the tiered store's pattern: blocks in shuffled order, DEFAULT_IO_THREADS readers each
            # reading one block at a time as aligned chunks in flight
            order = list(range(nbytes // block))
            random.Random(0).shuffle(order)
            direct = method == "O_DIRECT"
            depth, readers = (DEFAULT_IO_DEPTH, DEFAULT_IO_THREADS) if direct else (1, 1)
            pool = ThreadPoolExecutor(max(1, (depth - 1) * readers))

            def reader(r: int) -> int:
                mv = memoryview(bufs[r])
                return sum(read_aligned(rfd, mv, i * block, block, pool, depth) for i in order[r::readers])

            t0 = time.perf_counter()
            try:
                with ThreadPoolExecutor(readers) as rp:
                    got = sum(rp.map(reader, range(readers)))
            finally:
                pool.shutdown()
            dt = time.perf_counter() - t0
        finally:
            os.close(rfd)
            for b in bufs:
                b.close()
        return got / max(dt, 1e-9), method
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass


def measure_matmul_flops(dtype: str, n: int, seconds: float) -> float:
    """Dense ``n x n @ n x n`` FLOP/s (2 n^3 per product) in fp32 or bf16."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    a @ b  # warm up
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        el = time.perf_counter() - t0
        if el >= seconds or reps >= 1000:
            break
    return 2.0 * n**3 * reps / el


def measure_kernel_rates(threads: int, n: int = 1024, seconds: float = 0.1) -> dict[str, float]:
    """Native decode GEMV weights/s per census format ({} when the native library is unavailable)."""
    from moetier import native

    if native.library() is None:
        return {}
    from moetier.native.rates import planner_rates

    return planner_rates(threads, n, n, seconds)


def probe(sizes: ProbeSizes | None = None, directory: Path | None = None) -> dict[str, Any]:
    """Run all measurements; returns the JSON-ready record (SI units)."""
    import psutil
    import torch

    sizes = sizes or ProbeSizes()
    directory = directory or cache_dir()
    load = load_per_core()  # before our own work adds to it
    t_start = time.perf_counter()
    from moetier import native

    affinity = usable_cores()
    # memory: MEMORY_ROUNDS rounds spread over the other measurements (MemoryReaders), best pass kept
    mem = MemoryReaders(sizes.mem_bytes, affinity) if native.library() is not None else None
    passes = -(-max(1, sizes.mem_repeats) // MEMORY_ROUNDS)
    if mem is not None:
        mem.round(passes)
    disk_bw, disk_method = measure_disk_bw(directory, sizes.disk_bytes, sizes.disk_block)
    if mem is not None:
        mem.round(passes)
    f32 = measure_matmul_flops("fp32", sizes.matmul_n, sizes.matmul_seconds)
    bf16 = measure_matmul_flops("bf16", sizes.matmul_n, sizes.matmul_seconds)
    vm = psutil.virtual_memory()
    kernels = measure_kernel_rates(affinity, sizes.kernel_n, sizes.kernel_seconds)
    if mem is not None:
        mem.round(passes)
        mem_core, mem_bw = mem.rates()
        mem_method, mem_reader = MEMORY_METHOD, f"{read_isa()} loads, {READ_STREAMS} streams per thread"
        mem_rounds = [[one, every] for one, every in mem.rounds]
        del mem
    else:  # no native readers: torch's sum, wall clock (all cores)
        mem_core, mem_bw = measure_memory_bw(sizes.mem_bytes, sizes.mem_repeats, affinity)
        mem_method, mem_reader, mem_rounds = "torch sum, wall clock", None, []
    return {
        "version": PROBE_VERSION,
        "timestamp": time.time(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu_model": platform.processor() or platform.machine(),
        "cores_logical": os.cpu_count() or 1,
        "cores_usable": affinity,
        "cores_physical": psutil.cpu_count(logical=False) or None,
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": float(vm.total),
        "ram_available_bytes": float(vm.available),
        "disk_free_bytes": float(shutil.disk_usage(directory).free),
        "disk_dir": str(directory),
        "memory_read_bw": mem_bw,
        "memory_read_bw_per_core": mem_core,
        "memory_method": mem_method,
        "memory_reader": mem_reader,
        "memory_rounds": mem_rounds,  # [one core, all cores] bytes/s per round (the figures: the best)
        "disk_read_bw": disk_bw,
        "disk_method": disk_method,
        "matmul_flops": {"fp32": f32, "bf16": bf16},
        "kernel_rates": kernels,
        "kernel_rates_method": KERNEL_RATES_METHOD,
        "sizes": {"mem_bytes": memory_buffer_bytes(sizes.mem_bytes), "disk_bytes": sizes.disk_bytes,
                  "matmul_n": sizes.matmul_n},
        "probe_seconds": time.perf_counter() - t_start,
        "load_per_core": load,
    }


def load_per_core() -> float | None:
    """The 1-minute load average per usable core now (None where unknown)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    try:
        return os.getloadavg()[0] / max(1, n)
    except (OSError, AttributeError):  # pragma: no cover
        return None


def describe(rec: dict[str, Any], now: float | None = None) -> str:
    """'probed 2026-11-24T13:27:28Z (3.2 h ago) on HOST, load 0.10/core': shown wherever a probe is used."""
    age = (now if now is not None else time.time()) - float(rec.get("timestamp", 0))
    ago = (f"{age / 86400:.1f} days" if age >= 86400 else f"{age / 3600:.1f} h" if age >= 3600
           else f"{age / 60:.0f} min")
    load = rec.get("load_per_core")
    under = ("load unknown" if load is None else
             f"load {load:.2f}/core" + (" (busy: figures may be low)" if load > BUSY_LOAD_PER_CORE else ""))
    return f"probed {rec.get('timestamp_utc', '?')} ({ago} ago) on {rec.get('host', '?')}, {under}"


def stale_reason(rec: dict[str, Any], now: float | None = None, load_now: float | None = None) -> str | None:
    """Why a cached probe should be measured again (None: it is fine): older than
    :data:`STALE_SECONDS`, or taken under load while the machine is quiet now."""
    age = (now if now is not None else time.time()) - float(rec.get("timestamp", 0))
    if age > STALE_SECONDS:
        return f"is {age / 86400:.0f} days old"
    then = rec.get("load_per_core")
    if then is not None and then > BUSY_LOAD_PER_CORE and load_now is not None and load_now <= BUSY_LOAD_PER_CORE:
        return f"was taken under load ({then:.2f}/core; {load_now:.2f}/core now)"
    return None


# --------------------------------------------------------------------------------------
# cache


def load_cached() -> dict[str, Any] | None:
    p = cache_path()
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a corrupt cache is re-measured, never an error
    if not isinstance(data, dict) or data.get("version") != PROBE_VERSION:
        return None
    need = ("memory_read_bw", "disk_read_bw", "matmul_flops", "ram_bytes", "disk_free_bytes", "timestamp",
            "kernel_rates")  # a record from before kernel rates is measured again
    if any(k not in data for k in need) or data.get("kernel_rates_method") != KERNEL_RATES_METHOD:
        return None  # ... and one whose kernel rates were timed the older, load-sensitive way
    if "memory_method" not in data:
        return None  # ... or its memory bandwidth the old way (a wall-clock torch sum, unlabelled)
    return data


def get_probe(refresh: bool = False, sizes: ProbeSizes | None = None) -> tuple[dict[str, Any], bool]:
    """(record, from_cache). Measures and writes the cache when missing, ``refresh``, stale or
    taken under load while the machine is quiet now (:func:`stale_reason`; said on stderr)."""
    if not refresh:
        cached = load_cached()
        if cached is not None:
            why = stale_reason(cached, load_now=load_per_core())
            if why is None:
                return cached, True
            import sys

            print(f"moetier: measuring this machine again: the cached probe {why} (~20 s)", file=sys.stderr)
    rec = probe(sizes)
    p = cache_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=2), encoding="utf-8")
        tmp.replace(p)
    except OSError as e:
        raise MoetierError(f"probe cache {p}: cannot write ({e}); set MOETIER_CACHE_DIR to a writable dir") from None
    return rec, False


def machine_from_probe(rec: dict[str, Any], cores: int | None = None) -> Machine:
    """The measured ``cpu`` Machine: dram (compute) -> ssd. ``cores``: the machine as seen by a
    run on that many of the usable cores (e.g. ``--threads 1``): memory read at the one-core
    figure times ``cores`` (at most the all-core one), kernel rates scaled by ``cores`` / usable
    (they are one core's rate times the usable cores)."""
    usable = int(rec.get("cores_usable") or 1)
    mem_bw, scale = float(rec["memory_read_bw"]), 1.0
    if cores is not None and 0 < cores < usable:
        scale = cores / usable
        per_core = rec.get("memory_read_bw_per_core")
        mem_bw = min(mem_bw, float(per_core) * cores) if per_core else mem_bw * scale
    return Machine(
        name="cpu",
        tiers=(
            MemoryTier("dram", float(rec["ram_bytes"]), mem_bw),
            MemoryTier("ssd", float(rec["disk_free_bytes"]), float(rec["disk_read_bw"])),
        ),
        flops={k: float(v) for k, v in rec["matmul_flops"].items()},
        kernel_rates={k: float(v) * scale for k, v in rec.get("kernel_rates", {}).items()},
        kernels_add_to_memory=True,  # the CPU's own cores stream and compute (roofline module doc)
        efficiency=Efficiency(compute=1.0, memory=1.0, link=1.0),
        compute_tier="dram",
        confidence="M",
        source=f"moetier probe: {describe(rec)} (cache {cache_path()}; `moetier probe --refresh` re-measures)",
        notes=(
            f"measured: {rec.get('cores_usable', '?')} usable cores"
            + (f" (as seen by {cores})" if cores is not None and 0 < cores < usable else "")
            + f", memory read: {rec.get('memory_method', 'torch sum, wall clock')}, disk read "
            f"{rec.get('disk_method', '?')}, matmul n={rec.get('sizes', {}).get('matmul_n', '?')}, "
            f"native kernel rates: {', '.join(sorted(rec.get('kernel_rates', {}))) or 'not measured'}",
            "efficiency 1.0: figures are already sustained measurements",
            "ssd capacity = free space in the cache dir's filesystem",
        ),
    )


def cpu_machine(refresh: bool = False, sizes: ProbeSizes | None = None, cores: int | None = None) -> Machine:
    rec, _ = get_probe(refresh=refresh, sizes=sizes)
    return machine_from_probe(rec, cores)
