"""Shared benchmark plumbing: cgroup v1 memory caps, page-cache drops, medians, provenance.

Every engine is measured as its own process; when a memory cap applies, that process runs
inside a fresh cgroup v1 memory group (page cache included in the cap, as the kernel
charges it), so moetier, llama.cpp's mmap and transformers face the same limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
RESULTS = Path(__file__).resolve().parent / "results"
BENCH_LOCK = Path("/tmp/moetier-bench.lock")  # the lock of `flock /tmp/moetier-bench.lock CMD`


def _lock_holders(path: Path) -> set[int]:
    """PIDs holding a flock(2) lock on ``path`` (from /proc/locks; empty if unreadable)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return set()
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want and f[4].isdigit():
            pids.add(int(f[4]))
    return pids


def _ancestors() -> set[int]:
    pids, pid = set(), os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


@contextlib.contextmanager
def bench_lock(path: Path = BENCH_LOCK) -> Iterator[None]:
    """Hold the machine-wide benchmark lock (flock(2), the same lock as ``flock(1)`` on
    ``path``) so timed runs of different benchmarks never overlap on the shared cores. Under
    ``flock PATH python -m bench...`` the parent already holds it for us: taking it again
    would wait forever, so then this returns at once."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _lock_holders(path)
            if holders & _ancestors():
                yield  # held by the `flock` that started us
                return
            print(f"[bench] waiting for {path} (held by pid {', '.join(map(str, sorted(holders))) or '?'})",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cgroup_available() -> bool:
    return (CGROUP_ROOT / "cgroup.procs").exists() and os.access(CGROUP_ROOT, os.W_OK)


def drop_caches() -> bool:
    """Drop the page cache (root only). Returns False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@dataclass
class CappedResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cgroup_peak_bytes: int | None  # memory.max_usage_in_bytes (RSS + page cache charged)
    oom_killed: bool


def run_capped(cmd: Sequence[str], limit_bytes: int | None, *, timeout: float = 1800,
               env: dict[str, str] | None = None, cwd: str | None = None) -> CappedResult:
    """Run ``cmd`` in a new cgroup v1 memory group limited to ``limit_bytes`` (None = no cap)."""
    group = None
    if limit_bytes is not None:
        if not cgroup_available():
            raise RuntimeError("cgroup v1 memory controller is not writable here; cannot cap memory")
        group = CGROUP_ROOT / f"moetier-bench-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        try:  # no swap escape hatch
            (group / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
        except OSError:
            pass
    procs = str(group / "cgroup.procs") if group else None

    def _enter() -> None:
        if procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    t0 = time.perf_counter()
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           env=env, cwd=cwd, preexec_fn=_enter if procs else None)
        wall = time.perf_counter() - t0
        peak = oom = None
        if group:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom = "oom_kill 1" in (group / "memory.oom_control").read_text() or p.returncode in (-9, 137)
        return CappedResult(p.returncode, p.stdout, p.stderr, wall, peak, bool(oom))
    finally:
        if group:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def parse_worker_output(stdout: str) -> dict | None:
    """The ``BENCH_RESULT {json}`` line of a ``bench/peers.py`` worker (the last one), or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return None


def run_worker(cmd: Sequence[str], cap: int | None, *, timeout: float, env: dict[str, str] | None = None) -> dict:
    """One ``bench/peers.py`` worker, cold, in its own cgroup: the page cache dropped first,
    then ``cmd`` under a memory group limited to ``cap`` (RSS + page cache charged), or for
    ``cap=None`` a group at the machine's RAM size (used only to read the peak).

    Returns the worker's result plus ``status`` (ok | oom | failed | timeout),
    ``cgroup_peak_bytes``, ``wall_s``, ``page_cache_dropped`` and ``cap_bytes``."""
    dropped = drop_caches()
    limit = cap if cap is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        r = run_capped(cmd, limit, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"did not finish warm-up + runs within {timeout:.0f} s",
                "page_cache_dropped": dropped, "cap_bytes": cap}
    except Exception as e:  # cgroup missing
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "page_cache_dropped": dropped}
    res = parse_worker_output(r.stdout)
    base = {"cgroup_peak_bytes": r.cgroup_peak_bytes, "wall_s": r.wall_s, "page_cache_dropped": dropped,
            "cap_bytes": cap}
    if r.returncode != 0 or res is None:
        status = "oom" if r.oom_killed else "failed"
        return {"status": status, "returncode": r.returncode, "error": r.stderr[-2000:], **base}
    return {"status": "ok", **res, **base}


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def provenance() -> dict:
    """Machine and versions, stored beside every result."""
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "versions": {p: ver(p) for p in ("moetier", "torch", "transformers", "accelerate", "llama_cpp_python",
                                         "numpy", "safetensors")},
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2, sort_keys=False) + "\n")
    return out


def wait_healthy(server: subprocess.Popen, base: str, timeout: float = 300) -> None:
    """Block until the server at ``base`` answers /health with 200 (exit if it dies or times out)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("server did not come up")
        time.sleep(0.5)
