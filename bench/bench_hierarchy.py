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

Each configuration is run ``--reps`` times cold (the model files are dropped from the page
cache before every run: ``drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` on
every file); each run decodes ``--warmup`` tokens (counted out), then ``--tokens`` timed
tokens. Medians are reported with the planner's prediction for the same model, machine
(``moetier probe``) and cache size, and the measured store read bandwidth.

    python scripts/make_wide_model.py --out /tmp/wide --target-gb 8.5
    nice python bench/bench_hierarchy.py --model /tmp/wide --cap 3G --reps 5
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
# one measured run (in the capped child process)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(cfg.get("threads") or os.cpu_count() or 1))
    import moetier
    from moetier.weights import tiered

    t0 = time.perf_counter()
    engine = cfg["engine"]
    if engine == "tiered":
        model = tiered.load(cfg["model"], max_ram=cfg["cap"], policy=cfg["policy"], prefetch=cfg["prefetch"],
                            context=cfg["context"], io=cfg.get("io", "buffered"))
    elif engine == "mmap":
        model = moetier.load(cfg["model"], expert_provider_factory=lambda s, r: MmapExpertProvider(s, r))
    else:
        model = moetier.load(cfg["model"])
    load_s = time.perf_counter() - t0
    ids = model.tokenizer.encode(PROMPT)
    warm, n = int(cfg["warmup"]), int(cfg["tokens"])
    metrics = getattr(model, "hierarchy_metrics", None)
    # greedy decode of exactly warm + n tokens (no stop on eos: every run does the same work)
    seq = model.new_sequence(capacity=len(ids) + warm + n + 1)
    with torch.inference_mode():
        logits = model.step([(seq, ids)])
        stamps: list[float] = []
        gen: list[int] = []
        for i in range(warm + n):
            tok = int(logits[0].argmax())
            gen.append(tok)
            logits = model.step([(seq, [tok])])
            stamps.append(time.perf_counter())
            if i + 1 == warm and metrics is not None:
                metrics.reset()
    timed = stamps[warm - 1:] if warm > 0 else stamps
    tps = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None
    out: dict[str, Any] = {
        "engine": engine, "policy": cfg.get("policy"), "prefetch": cfg.get("prefetch"),
        "load_s": load_s, "decode_tokens_per_s": tps, "generated": len(gen),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "prompt_tokens": len(ids),
    }
    if metrics is not None:
        out.update(tiered.run_report(model, tps))
        out.pop("placement_plan", None)
    return out


# ---------------------------------------------------------------------------------------
# the driver


def run_config(args: argparse.Namespace, cfg: dict[str, Any], cap: int | None) -> dict[str, Any]:
    runs = []
    for _ in range(args.reps):
        how = evict(Path(args.model))
        r = run_capped([sys.executable, __file__, "--worker", json.dumps(cfg)], cap, timeout=args.timeout)
        if r.returncode != 0 or r.oom_killed:
            runs.append({"error": (r.stderr or "")[-1500:], "oom_killed": r.oom_killed,
                         "cgroup_peak_bytes": r.cgroup_peak_bytes})
            print(f"  {cfg['name']}: FAILED (oom={r.oom_killed}) {r.stderr[-300:]}", flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["cgroup_peak_bytes"] = r.cgroup_peak_bytes
        res["evict"] = how
        runs.append(res)
        print(f"  {cfg['name']}: {res['decode_tokens_per_s']:.2f} tok/s"
              + (f", hit {res['hit_rate']:.2f}, store {res['bytes_per_token']['store'] / 1e6:.0f} MB/tok, "
                 f"stall {res['stall_seconds']:.1f}s" if res.get("hit_rate") is not None else "")
              + f", peak {(r.cgroup_peak_bytes or res['peak_rss_bytes']) / 1e9:.2f} GB", flush=True)
    ok = [r for r in runs if "decode_tokens_per_s" in r and r["decode_tokens_per_s"]]
    summary: dict[str, Any] = {"config": cfg, "runs": runs, "ok_runs": len(ok)}
    if ok:
        summary["median_decode_tokens_per_s"] = median([r["decode_tokens_per_s"] for r in ok])
        for k in ("hit_rate", "stall_seconds", "prefetch_precision", "prefetch_recall",
                  "predicted_decode_tokens_per_s", "cgroup_peak_bytes", "peak_rss_bytes"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:
                summary[f"median_{k}"] = median(vals)
        st = [r["bytes_per_token"]["store"] for r in ok if r.get("bytes_per_token")]
        if st:
            summary["median_store_bytes_per_token"] = median(st)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="/tmp/moetier-wide")
    ap.add_argument("--cap", default="3G")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--policies", default="lru,lfu,lfu-decay,adaptive,static")
    ap.add_argument("--engines", default="tiered,mmap,ram")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--io", default="auto", choices=["buffered", "direct", "auto"])
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--name", default="bench_hierarchy")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from moetier.planner.census import census
    from moetier.planner.machines import get_machine
    from moetier.planner.roofline import predict_decode_tokens_per_s
    from moetier.spec import load_spec
    from moetier.weights.plan import parse_bytes

    model = Path(args.model)
    cap = parse_bytes(args.cap, "--cap")
    if not cgroup_available():
        raise SystemExit("cgroup v1 memory controller not writable: cannot cap memory")
    spec = load_spec(model)
    cen = census(spec, "bf16")
    disk = sum(f.stat().st_size for f in model_files(model))
    print(f"model {model}: {disk / 1e9:.2f} GB on disk, routed {cen.routed_bytes / 1e9:.2f} GB, always-on "
          f"{cen.always_on_bytes / 1e9:.3f} GB, expert {cen.expert_bytes / 1e6:.1f} MB; cap {cap / 1e9:.2f} GB",
          flush=True)
    bw = measure_read_bw(model)
    print(f"store read bandwidth: {json.dumps(bw)}", flush=True)
    base = {"model": str(model), "cap": cap, "context": args.context, "warmup": args.warmup,
            "tokens": args.tokens, "threads": args.threads, "io": args.io}
    engines = args.engines.split(",")
    results: list[dict[str, Any]] = []
    if "tiered" in engines:
        for pol in args.policies.split(","):
            for pf in (False, True):
                cfg = {**base, "engine": "tiered", "policy": pol, "prefetch": pf,
                       "name": f"tiered/{pol}{'+prefetch' if pf else ''}"}
                print(cfg["name"], flush=True)
                results.append(run_config(args, cfg, cap))
    if "mmap" in engines:
        cfg = {**base, "engine": "mmap", "name": "mmap"}
        print("mmap (page-cache baseline, same cap)", flush=True)
        results.append(run_config(args, cfg, cap))
    ram_note = None
    if "ram" in engines:
        import psutil

        avail = psutil.virtual_memory().available
        if avail > disk * 1.3 + 2e9:
            cfg = {**base, "engine": "ram", "name": "ram"}
            print("all in RAM (no cap)", flush=True)
            results.append(run_config(args, cfg, None))
        else:
            ram_note = f"skipped: {avail / 1e9:.1f} GB available < model {disk / 1e9:.1f} GB + headroom"
    # comparison
    tiered_rows = [r for r in results if r["config"]["engine"] == "tiered" and r.get("median_decode_tokens_per_s")]
    best = max(tiered_rows, key=lambda r: r["median_decode_tokens_per_s"], default=None)
    mm = next((r for r in results if r["config"]["engine"] == "mmap"), None)
    machine = get_machine("cpu")
    summary: dict[str, Any] = {
        "model": {"path": str(model), "bytes_on_disk": disk, "routed_bytes": cen.routed_bytes,
                  "always_on_bytes": cen.always_on_bytes, "expert_bytes": cen.expert_bytes,
                  "num_layers": spec.num_layers, "num_experts": spec.num_experts, "top_k": spec.top_k,
                  "expert_intermediate_size": spec.expert_intermediate_size, "hidden_size": spec.hidden_size},
        "cap_bytes": cap, "reps": args.reps, "tokens": args.tokens, "warmup": args.warmup,
        "store_read_bandwidth": bw, "machine": machine.name, "machine_source": machine.source,
        "ram_note": ram_note,
        "table": [{"name": r["config"]["name"], "median_decode_tokens_per_s": r.get("median_decode_tokens_per_s"),
                   "median_hit_rate": r.get("median_hit_rate"),
                   "median_store_bytes_per_token": r.get("median_store_bytes_per_token"),
                   "median_stall_seconds": r.get("median_stall_seconds"),
                   "median_prefetch_precision": r.get("median_prefetch_precision"),
                   "median_prefetch_recall": r.get("median_prefetch_recall"),
                   "median_predicted_decode_tokens_per_s": r.get("median_predicted_decode_tokens_per_s"),
                   "median_cgroup_peak_bytes": r.get("median_cgroup_peak_bytes"), "ok_runs": r["ok_runs"]}
                  for r in results],
    }
    if best is not None:
        b = best["median_decode_tokens_per_s"]
        summary["best"] = best["config"]["name"]
        summary["best_decode_tokens_per_s"] = b
        if mm and mm.get("median_decode_tokens_per_s"):
            summary["best_over_mmap"] = b / mm["median_decode_tokens_per_s"]
        pred = best.get("median_predicted_decode_tokens_per_s")
        if pred:
            summary["planner_bound_decode_tokens_per_s"] = pred
            summary["best_over_planner"] = b / pred
        # what binds: store bytes per token at the measured read bandwidth
        spt = best.get("median_store_bytes_per_token")
        if spt:
            rb = (bw.get("buffered_bytes_per_s") if args.io == "buffered" else None) or bw.get("direct_bytes_per_s")
            rates = [r["hierarchy"]["store_read_bytes_per_s"] for r in best["runs"]
                     if r.get("hierarchy", {}).get("store_read_bytes_per_s")]
            if rates:  # what the store reads achieved during the runs (I/O thread time)
                summary["median_store_read_bytes_per_s_in_runs"] = median(rates)
                summary["store_seconds_per_token_at_run_bw"] = spt / median(rates)
            summary["store_seconds_per_token_at_measured_bw"] = spt / rb if rb else None
            summary["measured_seconds_per_token"] = 1.0 / b
        hr = best.get("median_hit_rate")
        if hr is not None:
            summary["planner_bound_at_best_hit_rate"] = predict_decode_tokens_per_s(
                spec, machine, hit_rate=hr, cache_bytes=cap - cen.always_on_bytes, precision="bf16")
    out = write_result(args.name, {"summary": summary, "results": results})
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
