"""Raw O_DIRECT read throughput of expert-sized ranges: queue depth 1 vs several reads in flight.

Writes one scratch file (``--file-gb``, default 2 GiB; deleted afterwards), then reads a random
permutation of expert-sized ranges (``--expert-mb``, start offsets deliberately *not* 4096-aligned,
as in a safetensors file) the way :class:`moetier.weights.store.ExpertStore` does: the aligned span
into a page-aligned bounce buffer, then copies into a slot. Patterns, measured back to back in
rounds (the machine is shared, so compare ratios within a round):

* ``qd1``         - one ``preadv`` per expert (the store before issue 14 item 5);
* ``split{N}``    - :func:`moetier.weights.store.read_aligned` (what ``ExpertStore`` runs now, with
  ``io_depth=N``): the aligned span split into N aligned chunks read concurrently by a small thread
  pool (``os.preadv`` releases the GIL), each chunk copied into the slot by the thread that read it.

``--cgroup-mb M`` additionally runs every pattern inside a fresh cgroup-v1 memory child group capped
at M MiB (created under /sys/fs/cgroup/memory/, the process moves itself in and back out, and the
group is removed). Caches are dropped (``/proc/sys/vm/drop_caches``) before each pattern when
writable. Usage::

    python -m bench.bench_store_io --file-gb 2 --expert-mb 3,12 --rounds 2 --cgroup-mb 1024
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moetier.weights.store import ALIGN, DEFAULT_IO_DEPTH, read_aligned

CG_ROOT = Path("/sys/fs/cgroup/memory")


def device_queue() -> dict[str, str]:
    out = {}
    for d in sorted(Path("/sys/block").iterdir()):
        if d.name.startswith(("loop", "zram", "ram")):
            continue
        q = d / "queue"
        vals = []
        for k in ("logical_block_size", "max_sectors_kb", "optimal_io_size", "nr_requests"):
            try:
                vals.append(f"{k}={(q / k).read_text().strip()}")
            except OSError:
                pass
        out[d.name] = " ".join(vals)
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_file(directory: Path, nbytes: int) -> Path:
    fd, name = tempfile.mkstemp(prefix="bench-store-io-", suffix=".bin", dir=directory)
    block = os.urandom(8 << 20)
    with os.fdopen(fd, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return Path(name)


class Reader:
    """One pattern: reads (offset, nbytes) ranges into a slot via an aligned bounce buffer."""

    def __init__(self, path: Path, n_max: int, depth: int, pool: ThreadPoolExecutor):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.depth, self.pool = depth, pool
        self.bounce = mmap.mmap(-1, n_max + 2 * ALIGN)
        self.slot = torch.empty(n_max, dtype=torch.uint8)
        self.bytes, self.seconds = 0, 0.0

    def read(self, ranges: list[tuple[int, int]]) -> None:
        src = torch.frombuffer(self.bounce, dtype=torch.uint8)
        t0 = time.perf_counter()
        for off, n in ranges:
            a0 = off // ALIGN * ALIGN
            a1 = (off + n + ALIGN - 1) // ALIGN * ALIGN
            head = off - a0
            if self.depth <= 1:  # the store before: one preadv, then one copy
                got = os.preadv(self.fd, [memoryview(self.bounce)[: a1 - a0]], a0)
                self.slot[:n].copy_(src[head : head + n])
            else:  # the store now: chunks in flight, each copied out by the thread that read it

                def copy_out(lo: int, hi: int, head: int = head, n: int = n) -> None:
                    c0, c1 = max(lo, head), min(hi, head + n)
                    if c0 < c1:
                        self.slot[c0 - head : c1 - head].copy_(src[c0:c1])

                got = read_aligned(self.fd, memoryview(self.bounce), a0, a1 - a0, self.pool, self.depth,
                                   copy_out)
            assert got >= head + n, (got, off, n)
            self.bytes += n
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        os.close(self.fd)
        self.bounce.close()


def measure(path: Path, size: int, n: int, reads: int, depths: dict[str, int], pool: ThreadPoolExecutor,
            rng: random.Random, batch: int = 4) -> dict[str, float]:
    """Bytes/s per pattern; patterns alternate every ``batch`` reads (same load for all), and every
    read is of a distinct range (no cache reuse)."""
    header = 8 + 4096 * 3 + 136  # an unaligned safetensors-like data start
    slots = (size - header) // n
    idx = rng.sample(range(slots), min(slots, reads * len(depths)))
    readers = {k: Reader(path, n, d, pool) for k, d in depths.items()}
    drop_caches()
    try:
        for b in range(0, reads, batch):
            for j, r in enumerate(readers.values()):
                mine = idx[j * reads + b : j * reads + min(reads, b + batch)]
                r.read([(header + i * n, n) for i in mine])
        return {k: r.bytes / r.seconds for k, r in readers.items()}
    finally:
        for r in readers.values():
            r.close()


class CgroupCap:
    """Context manager: run inside a fresh cgroup-v1 memory child capped at ``mb`` MiB."""

    def __init__(self, mb: int):
        self.mb = mb
        self.path = CG_ROOT / f"moetier-bench-store-io-{os.getpid()}"
        self.prev: Path | None = None

    def __enter__(self) -> CgroupCap:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            if "memory" in ctrl.split(","):
                self.prev = CG_ROOT / rel.lstrip("/")
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.mb << 20))
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        back = self.prev if self.prev is not None and self.prev.exists() else CG_ROOT
        (back / "cgroup.procs").write_text(str(os.getpid()))
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass
        self.path.rmdir()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--file-gb", type=float, default=2.0)
    ap.add_argument("--expert-mb", default="3,12", help="comma-separated sizes (MiB) of one read")
    ap.add_argument("--reads", type=int, default=32, help="reads per pattern and size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--splits", default="2,4,8", help="comma-separated concurrent chunk counts")
    ap.add_argument("--cgroup-mb", type=int, default=0, help="also run inside a memory cap of this many MiB")
    a = ap.parse_args(argv)
    for name, q in device_queue().items():
        print(f"device {name}: {q}")
    size = int(a.file_gb * 2**30) // (8 << 20) * (8 << 20)
    sizes = [int(float(x) * 2**20) for x in a.expert_mb.split(",") if x]
    path = make_file(Path(a.dir), size)
    print(f"file {path} {size / 2**30:.2f} GiB; {a.reads} reads/pattern/size; "
          f"store default depth {DEFAULT_IO_DEPTH}")
    depths = {"qd1": 1} | {f"split{s}": int(s) for s in a.splits.split(",") if s}
    pool = ThreadPoolExecutor(max(depths.values()), thread_name_prefix="bench-io")
    rng = random.Random(0)
    ratios: dict[tuple[str, int, str], list[float]] = {}
    speeds: dict[tuple[str, int, str], list[float]] = {}
    try:
        where = [("host", 0)] + ([("cgroup", a.cgroup_mb)] if a.cgroup_mb else [])
        for rnd in range(a.rounds):
            for label, mb in where:
                for n in sizes:
                    if mb:
                        with CgroupCap(mb):
                            res = measure(path, size, n, a.reads, depths, pool, rng)
                    else:
                        res = measure(path, size, n, a.reads, depths, pool, rng)
                    base = res["qd1"]
                    for k, v in res.items():
                        ratios.setdefault((label, n, k), []).append(v / base)
                        speeds.setdefault((label, n, k), []).append(v)
                    print(f"round {rnd} {label:6s} {n / 2**20:5.1f} MiB  " + "  ".join(
                        f"{k} {v / 1e9:.2f} GB/s (x{v / base:.2f})" for k, v in res.items()), flush=True)
        print("median over rounds (GB/s, ratio to qd1 in the same round):")
        for (label, n, k), r in ratios.items():
            print(f"  {label:6s} {n / 2**20:5.1f} MiB {k:7s} {statistics.median(speeds[label, n, k]) / 1e9:.2f} GB/s "
                  f"x{statistics.median(r):.2f}")
    finally:
        pool.shutdown()
        path.unlink()


if __name__ == "__main__":
    main()
