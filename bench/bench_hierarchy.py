"""Weight-hierarchy benchmark: decode speed of a model far larger than the RAM cap.

Every engine runs as its own process inside a fresh cgroup v1 memory group capped at
``--cap`` (page cache charged to the cap), via :func:`bench.common.run_capped`:

* ``tiered/<policy>[+prefetch]`` - moetier's weight hierarchy (``--max-ram`` = the cap):
  always-on weights resident, routed experts in a policy-managed slot cache filled with
  ``pread`` from the safetensors files;
* ``mmap`` - the page-cache baseline (what llama.cpp does): the same runtime and model
  code, but every expert is a zero-copy view of an ``mmap`` of the safetensors files, so
  the kernel pages weights in on demand and evicts them under the cap;
* ``ram`` - every expert in RAM (no cap), when the machine has the memory.

Configurations run in ``--reps`` interleaved rounds (every configuration once per round: the
machine is shared), each cold (the model files are dropped from the page cache before every
run: ``drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` on every file); each run
decodes ``--warmup`` tokens (counted out), then ``--tokens`` timed tokens. Several models
(``--model A,B``: e.g. the bf16 wide model and its ``moetier quantize --format int4`` copy) run
under the same cap; ratios to the first model are reported.

The bound a run is held to is the planner's (``predict_decode_tokens_per_s`` at the run's hit
rate, its cache size and stored precision) with the disk figure of the planner's own probe
(``measure_disk_bw``) run *inside the same cgroup*, before loading and after the decode (the
mean; this disk is not steady). An I/O timeline of every store read says where the time goes:
the fraction of the decode the store was reading, its rate while reading, and the idle time
between reads split into "nothing was queued" and "queued, not started".

    python scripts/make_wide_model.py --out /tmp/wide --target-gb 8.5
    moetier quantize /tmp/wide /tmp/wide-int4 --format int4
    python bench/bench_hierarchy.py --model /tmp/wide,/tmp/wide-int4 --cap 2.95GB --reps 3 \
        --policies adaptive --prefetch on --variants io1:nice0,io2:nice-5 --engines tiered --name hierarchy_store
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cgroup_available, drop_caches, median, run_capped, write_result  # noqa: E402

PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the "
          "sun. Arise, fair sun, and kill the envious moon,")


# ---------------------------------------------------------------------------------------
# page-cache helpers


def model_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def evict(model: Path) -> str:
    """Drop the model's files from the page cache."""
    if drop_caches():
        return "drop_caches"
    for f in model_files(model):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def measure_read_bw(model: Path, limit: int = 2 * 10**9) -> dict[str, float]:
    """Sequential read bandwidth of the model files: O_DIRECT 16 MiB blocks and cold buffered."""
    out: dict[str, float] = {}
    files = model_files(model)
    buf = mmap.mmap(-1, 16 << 20)
    for mode in ("direct", "buffered"):
        evict(model)
        done, t0 = 0, time.perf_counter()
        for f in files:
            flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
            try:
                fd = os.open(f, flags)
            except OSError:
                continue
            off = 0
            try:
                while done < limit:
                    n = os.preadv(fd, [buf], off)
                    if n <= 0:
                        break
                    off += n
                    done += n
            finally:
                os.close(fd)
            if done >= limit:
                break
        out[f"{mode}_bytes_per_s"] = done / (time.perf_counter() - t0)
    evict(model)
    return out


# ---------------------------------------------------------------------------------------
# the mmap baseline provider (bench-local: not part of the product)


class MmapExpertProvider:
    """Experts as zero-copy views of mmap'ed safetensors files: the page cache decides."""

    def __init__(self, spec: Any, reader: Any):
        import torch

        from moetier.models.base import ExpertWeights

        self.maps: dict[Path, mmap.mmap] = {}
        self.experts: dict[tuple[int, int], Any] = {}
        idx = reader.index
        for layer in spec.moe_layer_ids:
            t = reader.layers[layer]
            if t.fused:
                raise SystemExit("mmap baseline: expects per-expert tensors")
            for e in range(spec.num_experts):
                g, u, d = (idx.info(n.format(e=e)) for n in (t.gate, t.up, t.down))
                mm = self._map(g.file)
                dt = g.torch_dtype

                def view(info: Any, shape: tuple[int, ...], mm: mmap.mmap = mm, dt: Any = dt) -> Any:
                    n = 1
                    for s in shape:
                        n *= s
                    return torch.frombuffer(mm, dtype=dt, count=n, offset=info.start).view(shape)

                inter, hidden = g.shape
                if g.file == u.file and g.end == u.start:  # adjacent: gate_up is one view
                    gu = view(g, (2 * inter, hidden))
                else:
                    gu = torch.cat([view(g, g.shape), view(u, u.shape)])
                self.experts[(layer, e)] = ExpertWeights(gu, view(d, d.shape))

    def _map(self, path: Path) -> mmap.mmap:
        m = self.maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private; reads come from page cache
            self.maps[path] = m
        return m

    def require(self, layer: int, expert_ids: Any) -> None:
        pass

    def get(self, layer: int, expert: int) -> Any:
        return self.experts[(layer, expert)]


# ---------------------------------------------------------------------------------------
# where the time goes: a timeline of the store's reads (bench-local instrumentation)


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one interval."""
    busy, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            busy += b - a
            end = b
    return busy


class IOTrace:
    """Times every expert read of a tiered model's store (``read_into``: the whole read, copies
    included) and every raw aligned read inside it (``read_aligned``: the device part), so a run
    can say how busy the device was, at what rate while busy, and how long compute waited."""

    def __init__(self, provider: Any):
        import threading

        from moetier.weights import store as store_mod

        store, worker = provider.store, provider.worker
        self.reads: list[tuple[float, float, int]] = []  # (start, end, bytes) per expert read
        self.raw: list[tuple[float, float, int]] = []  # (start, end, bytes) per read_aligned call
        self.submits: dict[tuple[int, int], list[float]] = {}  # (layer, expert) -> submit times
        self.starts: list[tuple[float, float, float | None]] = []  # (start, end, submitted) per read
        self._lock = threading.Lock()
        orig_read, orig_aligned, orig_submit = store.read_into, store_mod.read_aligned, worker.submit

        def submit(job: Any) -> Any:
            with self._lock:
                self.submits.setdefault(job.key, []).append(time.perf_counter())
            return orig_submit(job)

        def read_into(layer: int, expert: int, buf: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig_read(layer, expert, buf)
            finally:
                t1 = time.perf_counter()
                with self._lock:
                    self.reads.append((t0, t1, store.last_bytes()))
                    sub = self.submits.get((layer, expert))
                    self.starts.append((t0, t1, sub.pop(0) if sub else None))

        worker.submit = submit

        def read_aligned(fd: int, mv: Any, offset: int, nbytes: int, *a: Any, **k: Any) -> int:
            t0 = time.perf_counter()
            got = orig_aligned(fd, mv, offset, nbytes, *a, **k)
            with self._lock:
                self.raw.append((t0, time.perf_counter(), got))
            return got

        store.read_into = read_into
        store_mod.read_aligned = read_aligned

    def summary(self, lo: float, hi: float) -> dict[str, float]:
        """Figures of the window [lo, hi] (the timed decode tokens)."""
        wall = hi - lo
        rd = [(a, b, n) for a, b, n in self.reads if a >= lo and b <= hi]
        raw = [(a, b, n) for a, b, n in self.raw if a >= lo and b <= hi]
        busy = _union([(a, b) for a, b, _ in self.reads], lo, hi)
        dev = _union([(a, b) for a, b, _ in self.raw], lo, hi)
        nbytes = sum(n for _, _, n in rd)
        out = {"wall_s": wall, "reads": len(rd), "read_bytes": nbytes,
               "store_busy_s": busy, "store_busy_fraction": busy / wall if wall > 0 else 0.0,
               "device_busy_s": dev,
               "bytes_per_s_while_busy": nbytes / busy if busy > 0 else 0.0,
               "bytes_per_s_device": sum(n for _, _, n in raw) / dev if dev > 0 else 0.0,
               "bytes_per_s_wall": nbytes / wall if wall > 0 else 0.0}
        # idle device time between consecutive reads: nothing was queued yet (the runtime did not
        # know what to read) vs queued but not started (scheduling latency of the reader thread)
        st = sorted((a, b, sub) for a, b, sub in self.starts if a >= lo and b <= hi)
        nothing = waiting = 0.0
        for (_, e0, _), (s1, _, sub) in zip(st, st[1:]):
            if s1 <= e0:
                continue
            known = max(e0, min(sub if sub is not None else e0, s1))
            nothing += known - e0
            waiting += s1 - known
        out.update(idle_nothing_queued_s=nothing, idle_queued_not_started_s=waiting)
        if rd:
            lat = sorted(b - a for a, b, _ in rd)
            out["read_latency_median_s"] = lat[len(lat) // 2]
            out["read_bytes_median"] = sorted(n for _, _, n in rd)[len(rd) // 2]
        return out


def probe_disk_here(directory: Path) -> dict[str, Any]:
    """The planner's disk probe (``moetier.planner.probe.measure_disk_bw``: shuffled 8 MiB blocks,
    the store's chunks in flight) run in this process, i.e. inside the run's memory cgroup."""
    from moetier.planner.probe import ProbeSizes, measure_disk_bw

    s = ProbeSizes(disk_bytes=512 * 2**20)  # twice `moetier probe`'s: this disk is not steady
    bw, method = measure_disk_bw(directory, s.disk_bytes, s.disk_block)
    return {"disk_read_bw": bw, "disk_method": method, "disk_bytes": s.disk_bytes}


# ---------------------------------------------------------------------------------------
# one measured run (in the capped child process)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(cfg.get("threads") or os.cpu_count() or 1))
    import moetier
    from moetier.weights import tiered

    if cfg.get("io_nice") is not None:  # A/B of the reading threads' priority over compute
        from moetier.weights import store as store_mod

        store_mod.IO_NICE = int(cfg["io_nice"])
    probe_in = probe_disk_here(Path(cfg.get("probe_dir") or "/tmp")) if cfg.get("probe_in_cgroup") else None
    t0 = time.perf_counter()
    engine = cfg["engine"]
    if engine == "tiered":
        model = tiered.load(cfg["model"], max_ram=cfg["cap"], policy=cfg["policy"], prefetch=cfg["prefetch"],
                            context=cfg["context"], io=cfg.get("io", "buffered"),
                            **({"io_threads": cfg["io_threads"]} if cfg.get("io_threads") else {}))
    elif engine == "mmap":
        model = moetier.load(cfg["model"], expert_provider_factory=lambda s, r: MmapExpertProvider(s, r))
    else:
        model = moetier.load(cfg["model"])
    load_s = time.perf_counter() - t0
    trace = IOTrace(model.hierarchy) if engine == "tiered" else None
    ids = model.tokenizer.encode(PROMPT)
    warm, n = int(cfg["warmup"]), int(cfg["tokens"])
    metrics = getattr(model, "hierarchy_metrics", None)
    # greedy decode of exactly warm + n tokens (no stop on eos: every run does the same work)
    seq = model.new_sequence(capacity=len(ids) + warm + n + 1)
    with torch.inference_mode():
        logits = model.step([(seq, ids)])
        stamps: list[float] = [time.perf_counter()]
        gen: list[int] = []
        for i in range(warm + n):
            tok = int(logits[0].argmax())
            gen.append(tok)
            logits = model.step([(seq, [tok])])
            stamps.append(time.perf_counter())
            if i + 1 == warm and metrics is not None:
                metrics.reset()
    timed = stamps[warm:]
    tps = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None
    out: dict[str, Any] = {
        "engine": engine, "policy": cfg.get("policy"), "prefetch": cfg.get("prefetch"),
        "load_s": load_s, "decode_tokens_per_s": tps, "generated": len(gen), "ids": gen,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "prompt_tokens": len(ids), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    if metrics is not None:
        out.update(tiered.run_report(model, tps))
        out.pop("placement_plan", None)
    if trace is not None and len(timed) > 1:
        out["io_timeline"] = trace.summary(timed[0], timed[-1])
    if probe_in is not None:
        import gc

        hier = getattr(model, "hierarchy", None)
        bound_args = (model.spec, hier.cache_bytes + hier.pinned_bytes, model.placement_precision) if hier else None
        if hier is not None:
            hier.close()
        del model, hier, seq, logits, trace, metrics
        gc.collect()  # the slots go: room in the cgroup for the probe's scratch file
        after = probe_disk_here(Path(cfg.get("probe_dir") or "/tmp"))
        probe_in = {"disk_read_bw": (probe_in["disk_read_bw"] + after["disk_read_bw"]) / 2,
                    "before": probe_in["disk_read_bw"], "after": after["disk_read_bw"],
                    "disk_method": after["disk_method"], "disk_bytes": after["disk_bytes"]}
        out["probe_in_cgroup"] = probe_in
        if bound_args is not None and out.get("hit_rate") is not None:
            out["bound_in_cgroup_decode_tokens_per_s"] = bound_with_disk(bound_args, probe_in["disk_read_bw"],
                                                                        out["hit_rate"])
    return out


def bound_with_disk(args: Any, disk_bw: float, hit_rate: float) -> float | None:
    """The planner's decode bound (``predict_decode_tokens_per_s``) at ``hit_rate`` for ``args`` =
    (spec, cache bytes, stored precision), on the cached probe with its disk figure replaced."""
    from moetier.planner import probe
    from moetier.planner.roofline import predict_decode_tokens_per_s

    rec = probe.load_cached()
    if rec is None or args is None:
        return None
    spec, cache_bytes, precision = args
    return predict_decode_tokens_per_s(spec, probe.machine_from_probe({**rec, "disk_read_bw": disk_bw}),
                                       hit_rate=hit_rate, cache_bytes=cache_bytes, precision=precision)


# ---------------------------------------------------------------------------------------
# the driver


def run_once(args: argparse.Namespace, cfg: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """One cold run of ``cfg`` in its own capped process (page cache dropped first)."""
    how = evict(Path(cfg["model"]))
    load_before = os.getloadavg()[0]
    r = run_capped([sys.executable, __file__, "--worker", json.dumps(cfg)], cap, timeout=args.timeout)
    if r.returncode != 0 or r.oom_killed:
        print(f"  {cfg['name']}: FAILED (oom={r.oom_killed}) {r.stderr[-300:]}", flush=True)
        return {"error": (r.stderr or "")[-1500:], "oom_killed": r.oom_killed, "cgroup_peak_bytes": r.cgroup_peak_bytes}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(cgroup_peak_bytes=r.cgroup_peak_bytes, evict=how, load_average_before=load_before)
    bound = res.get("bound_in_cgroup_decode_tokens_per_s")
    if bound and res.get("decode_tokens_per_s"):
        res["over_bound_in_cgroup"] = res["decode_tokens_per_s"] / bound
    tl = res.get("io_timeline") or {}
    print(f"  {cfg['name']}: {res['decode_tokens_per_s']:.2f} tok/s"
          + (f", hit {res['hit_rate']:.2f}, store {res['bytes_per_token']['store'] / 1e6:.0f} MB/tok, "
             f"stall {res['stall_seconds']:.1f}s" if res.get("hit_rate") is not None else "")
          + (f", probe in cgroup {res['probe_in_cgroup']['disk_read_bw'] / 1e9:.2f} GB/s, bound {bound:.2f} "
             f"({res['over_bound_in_cgroup']:.2f}x)" if bound else "")
          + (f", store busy {tl['store_busy_fraction']:.2f} at {tl['bytes_per_s_while_busy'] / 1e9:.2f} GB/s "
             f"(device {tl['bytes_per_s_device'] / 1e9:.2f})" if tl else "")
          + f", peak {(r.cgroup_peak_bytes or res['peak_rss_bytes']) / 1e9:.2f} GB, load {load_before:.1f}",
          flush=True)
    return res


MEDIAN_KEYS = ("hit_rate", "stall_seconds", "prefetch_precision", "prefetch_recall", "predicted_decode_tokens_per_s",
               "bound_in_cgroup_decode_tokens_per_s", "over_bound_in_cgroup", "cgroup_peak_bytes", "peak_rss_bytes",
               "load_average_before")
TIMELINE_KEYS = ("store_busy_fraction", "bytes_per_s_while_busy", "bytes_per_s_device", "bytes_per_s_wall",
                 "read_latency_median_s")


def summarize(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "decode_tokens_per_s" in r and r["decode_tokens_per_s"]]
    summary: dict[str, Any] = {"config": cfg, "runs": runs, "ok_runs": len(ok)}
    if ok:
        summary["median_decode_tokens_per_s"] = median([r["decode_tokens_per_s"] for r in ok])
        for k in MEDIAN_KEYS:
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:
                summary[f"median_{k}"] = median(vals)
        for k in TIMELINE_KEYS:
            vals = [r["io_timeline"][k] for r in ok if r.get("io_timeline", {}).get(k) is not None]
            if vals:
                summary[f"median_{k}"] = median(vals)
        probes = [r["probe_in_cgroup"]["disk_read_bw"] for r in ok if r.get("probe_in_cgroup")]
        if probes:
            summary["median_probe_in_cgroup_bytes_per_s"] = median(probes)
        st = [r["bytes_per_token"]["store"] for r in ok if r.get("bytes_per_token")]
        if st:
            summary["median_store_bytes_per_token"] = median(st)
    return summary


def variants(args: argparse.Namespace) -> list[tuple[int | None, int | None]]:
    """(I/O threads, I/O nice) pairs to run: ``--variants io1:nice0,io2:nice-5``, else every
    combination of ``--io-threads`` and ``--io-nice`` (None: the runtime's default)."""
    if args.variants:
        import re

        out = []
        for v in args.variants.split(","):
            io, nice = re.search(r"io(\d+)", v), re.search(r"nice(-?\d+)", v)
            out.append((int(io.group(1)) if io else None, int(nice.group(1)) if nice else None))
        return out
    return [(iot, nice) for iot in [int(x) for x in args.io_threads.split(",") if x] or [None]
            for nice in [int(x) for x in args.io_nice.split(",") if x] or [None]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="/tmp/moetier-wide",
                    help="checkpoint dir; several comma-separated (e.g. the bf16 model and its `moetier quantize` "
                    "copy) are run interleaved under the same cap, the first one is the reference")
    ap.add_argument("--cap", default="3G")
    ap.add_argument("--reps", type=int, default=5, help="rounds; each round runs every configuration once")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--policies", default="lru,lfu,lfu-decay,adaptive,static")
    ap.add_argument("--prefetch", default="off,on", help="off | on | off,on")
    ap.add_argument("--engines", default="tiered,mmap,ram")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--io", default="auto", choices=["buffered", "direct", "auto"])
    ap.add_argument("--io-threads", default="", help="store reader threads, comma-separated values to compare "
                    "(default: the runtime's)")
    ap.add_argument("--io-nice", default="", help="nice steps of the reading threads over compute, comma-separated "
                    "values to compare (default: the runtime's, moetier.weights.store.IO_NICE)")
    ap.add_argument("--variants", default="", help="explicit (I/O threads, nice) pairs instead of the two lists' "
                    "combinations, e.g. io1:nice0,io2:nice-5")
    ap.add_argument("--no-probe-in-cgroup", dest="probe_in_cgroup", action="store_false",
                    help="skip the planner's disk probe inside each capped run (the fair bound)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--name", default="bench_hierarchy")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from moetier.planner import probe
    from moetier.planner.census import census
    from moetier.spec import load_spec
    from moetier.weights.plan import parse_bytes

    models = [Path(m) for m in args.model.split(",") if m]
    cap = parse_bytes(args.cap, "--cap")
    if not cgroup_available():
        raise SystemExit("cgroup v1 memory controller not writable: cannot cap memory")
    rec, _ = probe.get_probe()  # the planner's figures (memory, compute) for every bound below
    described = []
    for model in models:
        spec = load_spec(model)
        cen = census(spec, "bf16")
        disk = sum(f.stat().st_size for f in model_files(model))
        described.append({"path": str(model), "bytes_on_disk": disk, "quantization": (
            spec.quantization.method if spec.quantization else None), "num_layers": spec.num_layers,
            "num_experts": spec.num_experts, "top_k": spec.top_k, "bf16_expert_bytes": cen.expert_bytes,
            "expert_intermediate_size": spec.expert_intermediate_size, "hidden_size": spec.hidden_size})
        print(f"model {model}: {disk / 1e9:.2f} GB on disk, cap {cap / 1e9:.2f} GB", flush=True)
    bw = measure_read_bw(models[0])
    print(f"store read bandwidth (host, sequential): {json.dumps(bw)}", flush=True)
    engines = args.engines.split(",")
    cfgs: list[tuple[dict[str, Any], int | None]] = []
    base = {"cap": cap, "context": args.context, "warmup": args.warmup, "tokens": args.tokens,
            "threads": args.threads, "io": args.io,
            "probe_in_cgroup": args.probe_in_cgroup, "probe_dir": str(models[0].parent)}
    for model in models:
        tag = model.name if len(models) > 1 else ""
        mb = {**base, "model": str(model)}
        if "tiered" in engines:
            for pol in args.policies.split(","):
                for pf in [x == "on" for x in args.prefetch.split(",")]:
                    for iot, nice in variants(args):
                        name = (f"{tag + ':' if tag else ''}tiered/{pol}{'+prefetch' if pf else ''}"
                                + (f"/io{iot}" if iot else "") + (f"/nice{nice}" if nice is not None else ""))
                        cfgs.append(({**mb, "engine": "tiered", "policy": pol, "prefetch": pf, "io_threads": iot,
                                      "io_nice": nice, "name": name}, cap))
        if "mmap" in engines:
            cfgs.append(({**mb, "engine": "mmap", "name": f"{tag + ':' if tag else ''}mmap"}, cap))
    ram_note = None
    if "ram" in engines:  # every model that fits in RAM, uncapped: the compute ceiling of the same decode
        import psutil

        avail = psutil.virtual_memory().available
        for model, desc in zip(models, described):
            tag = model.name + ":" if len(models) > 1 else ""
            disk = desc["bytes_on_disk"]
            if avail > disk * 1.3 + 2e9:
                cfgs.append(({**base, "model": str(model), "engine": "ram", "name": f"{tag}ram",
                              "probe_in_cgroup": False}, None))
            else:
                ram_note = f"{tag}skipped: {avail / 1e9:.1f} GB available < model {disk / 1e9:.1f} GB + headroom"
    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c, _ in cfgs}
    for rep in range(args.reps):  # interleaved: every configuration once per round
        print(f"round {rep + 1}/{args.reps} (load {os.getloadavg()[0]:.1f})", flush=True)
        for cfg, c in cfgs:
            runs[cfg["name"]].append(run_once(args, cfg, c))
    results = [summarize(cfg, runs[cfg["name"]]) for cfg, _ in cfgs]
    summary: dict[str, Any] = {
        "models": described, "cap_bytes": cap, "reps": args.reps, "tokens": args.tokens, "warmup": args.warmup,
        "store_read_bandwidth_host": bw, "probe": probe.describe(rec), "probe_disk_read_bw_host": rec["disk_read_bw"],
        "ram_note": ram_note,
        "table": [{"name": r["config"]["name"], "ok_runs": r["ok_runs"],
                   **{k: v for k, v in r.items() if k.startswith("median_")}} for r in results],
    }
    # side by side: every tiered configuration of the other models vs the same one of the first
    ref = {r["config"]["name"].split(":", 1)[-1]: r for r in results
           if r["config"].get("model") == str(models[0]) and r.get("median_decode_tokens_per_s")}
    ratios = {}
    for r in results:
        if r["config"].get("model") in (None, str(models[0])) or not r.get("median_decode_tokens_per_s"):
            continue
        base_r = ref.get(r["config"]["name"].split(":", 1)[-1])
        if base_r:
            ratios[r["config"]["name"]] = r["median_decode_tokens_per_s"] / base_r["median_decode_tokens_per_s"]
    if ratios:
        summary["decode_over_first_model"] = ratios
    out = write_result(args.name, {"summary": summary, "results": results})
    print(json.dumps({k: v for k, v in summary.items() if k != "models"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
