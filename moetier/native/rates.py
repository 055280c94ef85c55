"""Kernel rates: how fast the native GEMV reads each weight format on this machine.

:func:`measure` times ``y = W x`` (decode's matrix-vector product) for one format, ISA and
thread count on a random weight in that format's stored layout and returns weights/s and
stored bytes/s; :func:`measure_all` does it for every format. The planner (``moetier probe``)
learns the per-format decode kernel rates from :func:`planner_rates` (``Machine.kernel_rates``:
the planner bounds a decode step by them); ``bench/bench_kernels.py`` prints a table.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moetier import native
from moetier.native.weights import GGML_BLOCKS, describe
from moetier.quant import QTensor

__all__ = ["FORMATS", "PLANNER_FORMATS", "Rate", "measure", "measure_all", "planner_rates", "random_weight"]

FORMATS = ("f32", "bf16", "f16", "fp8_e4m3_block", "int8_group", "int4_group", "mxfp4", *GGML_BLOCKS)
_F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
               "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "ggml_mxfp4": ()}


@dataclass(frozen=True)
class Rate:
    fmt: str
    isa: str
    threads: int
    rows: int
    cols: int
    seconds: float  # per product (best of the repeats)
    nbytes: int  # stored bytes read per product

    @property
    def weights_per_s(self) -> float:
        return self.rows * self.cols / self.seconds

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds


def random_weight(fmt: str, rows: int, cols: int, seed: int = 0, group: int = 128) -> torch.Tensor | QTensor:
    """A random ``[rows, cols]`` weight stored in ``fmt`` (finite values; cols rounded up to the
    format's block size by the caller's choice of shape); ``group``: values per scale of the
    int4 / int8 group formats."""
    gen = torch.Generator().manual_seed(seed)
    plain = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    if fmt in plain:
        return torch.randn(rows, cols, generator=gen).to(plain[fmt])
    if fmt in GGML_BLOCKS:
        _, bs, nb = GGML_BLOCKS[fmt]
        n = cols // bs
        b = torch.randint(0, 256, (rows, n, nb), generator=gen, dtype=torch.uint8)
        for off in _F16_FIELDS[fmt]:
            v = (torch.rand(rows, n, generator=gen) * 0.01).to(torch.float16)
            b[:, :, off : off + 2] = v.view(torch.uint8).view(rows, n, 2)
        if fmt == "ggml_mxfp4":
            b[:, :, 0] = 120
        return QTensor(fmt, (rows, cols), b.view(rows, n * nb), block=(1, bs))
    if fmt == "fp8_e4m3_block":
        codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0
        scale = torch.rand(math.ceil(rows / 128), math.ceil(cols / 128), generator=gen)
        return QTensor(fmt, (rows, cols), codes.view(torch.float8_e4m3fn), scale, block=(128, 128))
    if fmt == "mxfp4":
        data = torch.randint(0, 256, (rows, math.ceil(cols / 32) * 16), generator=gen, dtype=torch.uint8)
        scale = torch.full((rows, math.ceil(cols / 32)), 120, dtype=torch.uint8)
        return QTensor(fmt, (rows, cols), data, scale, block=(1, 32))
    if fmt in ("int4_group", "int8_group"):
        bits = 4 if fmt == "int4_group" else 8
        words = math.ceil(cols * bits / 32)
        data = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=gen, dtype=torch.int32)
        scale = (torch.rand(rows, math.ceil(cols / group), generator=gen) * 0.01).to(torch.bfloat16)
        return QTensor(fmt, (rows, cols), data, scale, block=(1, group), meta={"bits": bits, "symmetric": True})
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def _nbytes(w: torch.Tensor | QTensor) -> int:
    if isinstance(w, QTensor):
        return w.nbytes
    return w.numel() * w.element_size()


def measure(fmt: str, isa: str | None = None, threads: int = 1, rows: int = 4096, cols: int = 4096,
            repeats: int = 5, seconds: float = 0.3, group: int = 128, warmup: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> Rate:
    """Time ``y = W x`` for a random ``fmt`` weight (best of ``repeats`` batches of products
    filling about ``seconds`` in total, after ``warmup`` untimed products). ``isa`` None: the
    default (best) one. ``clock``: wall time by default; ``time.thread_time`` at ``threads=1``
    counts only the CPU time the product took (the calling thread runs it), not time spent
    descheduled by other processes."""
    lib = native.library()
    if lib is None:
        raise RuntimeError(native.unavailable_reason() or "native kernels unavailable")
    w = random_weight(fmt, rows, cols, group=group)
    d = describe(w)
    x = torch.randn(cols)
    y = torch.empty(rows)
    args = (ctypes.byref(d), None, 0, x.data_ptr(), y.data_ptr(), threads)
    before = native.isa()
    try:
        if isa is not None:
            native.set_isa(isa)
        used = native.isa() or "?"
        for _ in range(max(1, warmup)):  # warm-up: pages in, caches, worker threads awake, clocks up
            lib.mt_gemv(*args)
        t = clock()
        lib.mt_gemv(*args)
        one = max(clock() - t, 1e-7)
        n = max(1, int(seconds / repeats / one))
        best = math.inf
        for _ in range(repeats):
            t = clock()
            for _ in range(n):
                lib.mt_gemv(*args)
            best = min(best, max(clock() - t, 1e-9) / n)
    finally:
        native.set_isa(before)
    return Rate(fmt, used, threads, rows, cols, best, _nbytes(w))


def measure_all(isa: str | None = None, threads: int = 1, rows: int = 4096, cols: int = 4096,
                formats: tuple[str, ...] = FORMATS, seconds: float = 0.3) -> dict[str, Rate]:
    """:func:`measure` for every format: ``{fmt: Rate}`` (for the planner's per-format rates)."""
    return {f: measure(f, isa, threads, rows, cols, seconds=seconds) for f in formats}


# census format (the planner's names) -> (native format, group size)
PLANNER_FORMATS = {"fp32": ("f32", 0), "bf16": ("bf16", 0), "fp8": ("fp8_e4m3_block", 0),
                   "int8:g128": ("int8_group", 128), "int4:g32": ("int4_group", 32),
                   "int4:g128": ("int4_group", 128), "fp4": ("mxfp4", 0),
                   **{t: (t, 0) for t in GGML_BLOCKS if t != "ggml_mxfp4"}}  # GGUF files' types (q8_0, q4_k, ...)


def planner_rates(threads: int, rows: int = 1024, cols: int = 1024, seconds: float = 0.1,
                  rounds: int = 3) -> dict[str, float]:
    """Decode GEMV weights/s per census format for ``threads`` cores (``moetier probe``:
    ``Machine.kernel_rates``). The weight is small enough to stay in cache, so this is the
    kernel's compute rate; the planner adds the memory time separately on a CPU (the roofline
    module doc). Measured on one thread in that thread's CPU time (``time.thread_time``: time
    spent descheduled by other processes does not count), best of ``rounds`` passes over all
    formats (each about ``seconds`` / ``rounds`` of CPU time after a warm-up), times ``threads``
    (the rows split evenly over the cores; compute in cache scales with them: int4 g32 10.4 /
    20.1, int8 g128 20.1 / 40.0 Gweights/s at 1 / 2 threads, quiet, 4096 x 4096). Why: the wall
    clock at all cores on this shared 2-core machine read int4 g128 at 14 Gweights/s under load
    vs 37-41 quiet, and gave 1.5-4x spreads between three probes a minute apart at load 10-15,
    where this reads bf16 38.7-42.7, fp8 24.7-25.2, int8 g128 32.3-32.6, int4 g32 41.6-43.0 per
    core (2026-12-02, load average 10)."""
    best: dict[str, float] = {}
    for _ in range(max(1, rounds)):
        for name, (fmt, g) in PLANNER_FORMATS.items():
            bs = GGML_BLOCKS[fmt][1] if fmt in GGML_BLOCKS else 1  # whole blocks per row
            r = measure(fmt, None, 1, rows, -(-cols // bs) * bs, seconds=seconds / max(1, rounds), group=g or 128,
                        clock=time.thread_time)
            best[name] = max(best.get(name, 0.0), r.weights_per_s)
    return {name: v * max(1, threads) for name, v in best.items()}
