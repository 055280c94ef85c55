"""How many CPU threads to compute with: the cores this process may use, minus those other work is using.

Parallel regions on a ~50 us op are cheap only when every thread has a core: when another
process holds one, a 2-thread region waits for the descheduled thread (and OpenMP workers
spinning for it take the core from the thread doing the work), and a step measured 10-100x
slower than with one thread. So the default thread count is chosen from what the machine
actually gives, and re-chosen while the model runs:

- :func:`available_cores`: physical cores in the CPU affinity set (``sched_getaffinity``;
  SMT siblings count once), capped by the cgroup CPU quota (v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded down, at least 1).
- :class:`CpuLoad`: other work = busy time of the CPUs in the affinity set (``/proc/stat``,
  steal included: a hypervisor's other guests count as other work) minus this process's own
  CPU time, over the interval since the previous sample, in cores.
- :func:`choose`: ``cores - floor(others + 1 - DROP_AT)`` (at least 1): a thread is given up
  as soon as other work takes ``DROP_AT`` (0.3) of a core, because a busy neighbour costs a
  thread-per-core region far more (2-100x) than one thread fewer costs an idle machine
  (0.8x on 2 cores); it is taken back only when other work is below ``RAISE_AT`` (0.15).
- :class:`AutoThreads`: what ``moetier.load(threads=None)`` attaches to a model; every
  ``Model.step`` calls :meth:`AutoThreads.update`, which re-samples at most every
  ``INTERVAL`` seconds and calls ``torch.set_num_threads`` (torch and the native kernels
  share that count) when the choice changes. ``threads=N`` fixes the count instead, and so
  does a ``torch.set_num_threads`` call made by someone else (adapting then stops).

OpenMP workers that wait spin ~1 ms instead of libgomp's ~8 ms before they sleep: see
:func:`set_wait_policy`, which ``import moetier`` calls before torch (and its libgomp) load.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

DROP_AT = 0.3  # other work (in cores) at which one thread is given up
RAISE_AT = 0.15  # ... and below which it is taken back
INTERVAL = 0.5  # seconds between two load samples while a model runs
FIRST_WINDOW = 0.05  # shortest sampling window for the first choice
SPINCOUNT = "30000"  # GOMP_SPINCOUNT default (~0.8 ms of pause on Zen 4), see set_wait_policy


def set_wait_policy(environ: dict[str, str] | None = None) -> bool:
    """Default ``GOMP_SPINCOUNT`` (libgomp, torch's OpenMP) to ``SPINCOUNT`` unless the user set
    it or ``OMP_WAIT_POLICY``. Takes effect only before libgomp loads (before ``import torch``);
    returns whether it was set. libgomp's default spin is 300,000 iterations (~8 ms of ``pause``
    on Zen 4): waiting workers hold their core that long after every parallel region, which on
    a busy machine takes it from the thread doing the work. Measured on the embedded model,
    2 threads, 2-core EPYC (bench/bench_busy.py workers, tok/s prefill / decode): with the
    machine to ourselves (SCHED_FIFO) spin 300,000: 3,170-4,370 / 3,100-4,790; 30,000:
    2,980-5,020 / 3,420-4,990; 10,000: 2,670-4,540 / 2,890-4,500; 2,000: 2,460-3,620 /
    2,600-3,140; 0 (= OMP_WAIT_POLICY=PASSIVE): 900-1,410 / 800-1,180 (waking a sleeping
    worker costs more than a ~50 us region). With other work on the cores no spin is best,
    and the thread count (see :func:`choose`) is what avoids the collapse; 30,000 keeps the
    idle-machine speed and bounds a futile spin to ~1 ms."""
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return False
    env["GOMP_SPINCOUNT"] = SPINCOUNT
    return True


def _cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def affinity() -> set[int]:
    """CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Number of distinct physical cores among ``cpus`` (SMT siblings count once)."""
    groups = set()
    for c in cpus:
        try:
            groups.add(frozenset(_cpu_list((sysfs / f"cpu{c}/topology/thread_siblings_list").read_text())))
        except (OSError, ValueError):
            groups.add(frozenset({c}))
    return max(1, len(groups))


def _cgroup_dirs(proc_cgroup: str, root: Path) -> list[tuple[str, Path]]:
    """(version, directory) candidates holding this process's CPU limits, innermost first."""
    out: list[tuple[str, Path]] = []
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            base, version = root, "v2"
        elif "cpu" in ctrls.split(","):
            base = next((root / d for d in (ctrls, "cpu,cpuacct", "cpu") if (root / d).is_dir()), root / "cpu")
            version = "v1"
        else:
            continue
        d = base / path.lstrip("/")
        while True:  # the process's group and its ancestors (any of them may hold the limit)
            out.append((version, d))
            if d == base:
                break
            d = d.parent
    return out


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> float | None:
    """The tightest cgroup CPU quota on this process, in cores (``None`` = no quota)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    best: float | None = None
    for version, d in _cgroup_dirs(proc_cgroup, root):
        try:
            if version == "v2":
                quota, _, period = (d / "cpu.max").read_text().strip().partition(" ")
                if quota == "max":
                    continue
                q = int(quota) / int(period or 100000)
            else:
                quota_us = int((d / "cpu.cfs_quota_us").read_text())
                if quota_us <= 0:
                    continue
                q = quota_us / int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        best = q if best is None else min(best, q)
    return best


def available_cores() -> int:
    """Physical cores in the affinity set, capped by the cgroup quota (rounded down, >= 1)."""
    n = physical_cores(affinity())
    q = cgroup_quota()
    if q is not None:
        n = min(n, max(1, math.floor(q)))
    return n


def _busy_jiffies(cpus: set[int], stat: str) -> int:
    """Busy ticks (all but idle and iowait) of ``cpus`` in /proc/stat text."""
    total = 0
    for line in stat.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu in cpus:
            v = [int(f) for f in fields[:8]] + [0] * 8
            total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return total


class CpuLoad:
    """Other work on our CPUs, in cores, averaged between two calls of :meth:`sample`."""

    def __init__(self, cpus: set[int] | None = None, stat_path: str = "/proc/stat"):
        self.cpus = cpus if cpus is not None else affinity()
        self.stat_path = stat_path
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self) -> tuple[float, int, float] | None:
        try:
            with open(self.stat_path) as f:
                stat = f.read()
        except OSError:
            return None
        return time.monotonic(), _busy_jiffies(self.cpus, stat), time.process_time()

    def elapsed(self) -> float:
        return time.monotonic() - self.last[0] if self.last else math.inf

    def sample(self) -> float | None:
        """Other work since the previous sample, in cores (``None`` if /proc/stat is unreadable)."""
        now = self._read()
        prev, self.last = self.last, now
        if now is None or prev is None or now[0] <= prev[0]:
            return None
        wall = now[0] - prev[0]
        busy = (now[1] - prev[1]) / self.hz / wall
        ours = (now[2] - prev[2]) / wall
        return min(float(len(self.cpus)), max(0.0, busy - ours))


def choose(cores: int, others: float, current: int | None = None) -> int:
    """Threads for ``cores`` usable cores when other work takes ``others`` cores (see module doc)."""
    n = max(1, cores - math.floor(others + 1 - DROP_AT))
    if current is not None and n > current:  # take a thread back only when clearly free
        n = max(current, min(n, cores - math.floor(others + 1 - RAISE_AT)))
    return min(n, cores)


class AutoThreads:
    """The adaptive thread count of one process (shared by every model loaded with ``threads=None``)."""

    def __init__(self) -> None:
        self.cores = available_cores()
        self.load = CpuLoad()
        self.threads: int | None = None  # the last count this object set
        self.others: float | None = None  # the last measured other work, in cores
        self.changes = 0
        self.overridden = False  # torch.set_num_threads was called by someone else: leave it

    def update(self, force: bool = False) -> int:
        """Re-sample when ``INTERVAL`` has passed (or the first time, after ``FIRST_WINDOW``) and
        apply the choice with ``torch.set_num_threads``; returns the thread count in force."""
        import torch

        if self.overridden:
            return torch.get_num_threads()
        if self.threads is None:  # first choice: a short window is enough
            wait = FIRST_WINDOW - self.load.elapsed()
            if wait > 0:
                time.sleep(wait)
        elif not force and self.load.elapsed() < INTERVAL:
            return self.threads
        elif torch.get_num_threads() != self.threads:  # an explicit choice was made since: it wins
            self.overridden = True
            return torch.get_num_threads()
        others = self.load.sample()
        if others is None:  # no /proc/stat: every core
            n = self.cores
        else:
            self.others = others
            n = choose(self.cores, others, self.threads)
        if n != self.threads:
            if self.threads is not None:
                self.changes += 1
            torch.set_num_threads(n)
            self.threads = n
        return n

    def describe(self) -> dict[str, object]:
        if self.overridden:
            import torch

            return {"mode": "fixed (torch.set_num_threads)", "threads": torch.get_num_threads(), "cores": self.cores}
        return {"mode": "auto", "threads": self.threads, "cores": self.cores,
                "other_load_cores": None if self.others is None else round(self.others, 2), "changes": self.changes}


_auto: AutoThreads | None = None


def auto() -> AutoThreads:
    """The process's :class:`AutoThreads` (created on first use)."""
    global _auto
    if _auto is None:
        _auto = AutoThreads()
    return _auto
