"""moetier vs llama.cpp on the SAME GGUF file: speed, greedy tokens, and distance to the float model.

    python -m bench.bench_gguf [--scenarios embedded,ram] [--types Q8_0,Q4_K_M] [--threads 2]   # also BF16
                               [--prompts 64,512] [--tokens 32] [--rounds 2] [--out bench/results/gguf.json]
    python -m bench.bench_gguf --report bench/results/gguf.json   # the README table from the JSON
    python -m bench.bench_gguf --scenarios cap --types Q4_K_M --prompts 64 --tokens 16 --runs 2 \
                               --out bench/results/gguf_cap.json            # (c): under a memory cap

Files: each scenario's checkpoint (``bench/scenarios.py``: (a) the embedded model, (b) the
2.5 GB synthetic Qwen3-MoE, (c) ``cap``: the ~8.5 GB "wide" model of the bf16 over-cap
scenario) converted by llama.cpp's ``convert_hf_to_gguf.py`` at bf16, then
quantized by llama.cpp's own quantizer (``llama_model_quantize`` = ``llama-quantize``,
through ``bench/peers.py quantize``) to each type; cached in ``$MOETIER_BENCH_CACHE/gguf``.
Both engines read that one file.

Per (scenario, type), interleaved rounds (moetier, llama.cpp, moetier, ...), every engine in
its own process (``bench/peers.py``) with the same threads and the same prompt ids:
prefill tok/s for each prompt length and decode tok/s (32 greedy tokens after the 64-token
prompt). Accuracy, in a separate untimed pass (``--accuracy``), on the 64-token prompt:
each engine's decode-path logits (one token per forward, teacher-forced along moetier's
greedy continuation) vs the dequantized float32 model (moetier's torch path in float32 on the
same file: every weight exactly ``gguf.quants.dequantize``'s value, float32 activations; the
tests check that path against transformers), and whether the 32 greedy tokens are identical.

(c) ``cap``: the quantized file is ~3x the memory cap (:func:`choose_cap`: a third of the
file, raised to moetier's own smallest ``--max-ram`` for it if that is larger, which
:func:`moetier_smallest_max_ram` reads from moetier's refusal of a too-small budget). Every
worker of this scenario runs inside a fresh cgroup-v1 memory group at the cap (page cache
charged; ``bench.common.run_worker``, the bf16 side-by-side's code) after the page cache is
dropped: moetier with ``max_ram`` = the cap and prefetch on (``scenarios.overcap_moetier_options``:
routed experts read from the GGUF file's byte ranges into its expert cache, nothing mapped),
llama.cpp with mmap (its default): first one bounded try (``--repack-try-s``, 180 s) with
``use_extra_bufts`` as ``bench/peers.py`` decides; its repacked layouts are copies of the
weights in anonymous memory, which a cap below the file cannot hold (on this machine the
loader sat at the cap, in page-fault waits, for minutes), so when that try does not finish
(recorded as ``llama_cpp_repack_try``) the timed llama.cpp runs use ``use_extra_bufts=False``
(llama.cpp's ``--no-repack``: every weight served from the mapped file). Recorded per
engine: cgroup peak, peak RSS, and moetier's hit rate and bytes read over the timed runs.
Every timed worker (all scenarios) holds ``/tmp/moetier-bench.lock`` (``bench.common.bench_lock``,
the lock of ``flock /tmp/moetier-bench.lock``; under ``flock`` of that file the bench sees its parent
holding it and does not wait for itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scenarios as sc
from bench.common import bench_lock, run_worker

TYPES = ("Q8_0", "Q4_K_M")
# bench_gguf scenario -> bench/scenarios.py scenario of the checkpoint
SOURCES = {"embedded": "embedded", "ram": "ram", "cap": "overcap", "mla": "mla"}
CAP_RATIO = 3.0  # (c): the file is ~3x the cap
GIB_8 = sc.GIB // 8
CAP_TIMEOUT_S = 900.0  # one worker under the cap (load + warm-up + runs)


def _log(msg: str) -> None:
    print(f"[bench_gguf] {msg}", file=sys.stderr, flush=True)


def ensure_quantized(src: Path, recipe: str) -> Path:
    """``src`` (a bf16 GGUF) quantized by llama.cpp to ``recipe`` (cached next to it); ``BF16``:
    ``src`` itself."""
    if recipe.upper() == "BF16":
        return src
    out = src.with_name(src.name.replace("-bf16.gguf", f"-{recipe}.gguf"))
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    _log(f"quantizing {src.name} -> {out.name} with llama.cpp's llama_model_quantize")
    p = subprocess.run([str(sc.llama_python()), str(sc.PEERS), "quantize", str(src), str(tmp), recipe],
                       capture_output=True, text=True)
    if p.returncode != 0 or not tmp.exists():
        raise RuntimeError(f"quantizing {src} to {recipe} failed:\n{p.stderr[-3000:]}")
    tmp.rename(out)
    return out


def _mla_model() -> Path:
    """The DeepSeek-V2-Lite-shaped synthetic of bench_mla.py (a deepseek2 GGUF: MLA)."""
    from bench.bench_mla import ensure_model

    return ensure_model(3)


def scenario_file(name: str, recipe: str) -> Path:
    checkpoints = {n: s.resolve for n, s in {**sc.SCENARIOS, **sc.EXTRA_SCENARIOS}.items()} | {"mla": _mla_model}
    return ensure_quantized(sc.ensure_gguf(checkpoints[SOURCES.get(name, name)](), "bf16"), recipe)


def choose_cap(file_bytes: int, moetier_smallest: int | None, ratio: float = CAP_RATIO) -> int:
    """The memory cap of (c): ``file_bytes / ratio`` rounded to 1/8 GiB, raised (rounded up to
    1/8 GiB) to moetier's smallest working ``--max-ram`` for the file when that is larger."""
    cap = max(1, round(file_bytes / ratio / GIB_8)) * GIB_8
    if moetier_smallest is not None and moetier_smallest > cap:
        cap = -(-int(moetier_smallest) // GIB_8) * GIB_8
    return cap


def moetier_smallest_max_ram(model: Path, threads: int) -> int | None:
    """moetier's smallest working ``--max-ram`` for ``model`` with the cap options (prefetch on),
    read from its refusal of a too-small budget ("the smallest that works is --max-ram NNNM"),
    in a fresh process (the budget counts the process's own RSS). The first budget tried,
    1 MB, is refused as below the always-on set (its size in GB named); the second, just
    above that set, by the budget check that names the smallest."""
    code = f"""
import re, moetier.weights.tiered as t
budget = 10**6
for _ in range(3):
    try:
        t.load({str(model)!r}, tokenizer=False, dtype="float32", threads={threads}, max_ram=f"{{budget}}B",
               prefetch=True)
        print("LOADED", budget)
        break
    except Exception as e:
        print(e)
        m = re.search(r"below the always-on set of .*?[(]([0-9.]+) GB", str(e))
        if not m:
            break
        budget = int(float(m.group(1)) * 1e9) + 16 * 10**6
"""
    env = {**os.environ, "PYTHONPATH": str(sc.REPO)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    m = re.search(r"smallest that works is --max-ram (\d+)M", p.stdout + p.stderr)
    return int(m.group(1)) * 10**6 if m else None


def run_dtype(model: Path) -> str:
    """moetier's dtype for ``model``: ``bfloat16`` for the bf16 file (weights kept in their bf16
    bytes, as llama.cpp keeps them; ``float32`` would hold and stream a float32 copy, twice the
    bytes), else ``float32`` (quantized weights stay in their blocks either way; float32 is the
    activations' type of moetier's native quantized kernels)."""
    return "bfloat16" if model.name.endswith("-bf16.gguf") else "float32"


def _worker(engine: str, model: Path, ids: list[int], tokens: int, runs: int, threads: int,
            cap: int | None = None, options: dict[str, Any] | None = None,
            timeout: float = CAP_TIMEOUT_S) -> dict[str, Any]:
    """One engine process (holding the bench lock). ``cap``: cold (page cache dropped) inside a
    cgroup memory group at ``cap`` bytes (``timeout`` seconds at most); ``options``: the
    engine's JSON options."""
    py = str(sc.llama_python()) if engine == "llama_cpp" else sys.executable
    cmd = [py, str(sc.PEERS), "moetier_steps" if engine == "moetier" else engine, str(model),
           "--prompt-ids", ",".join(map(str, ids)), "--tokens", str(tokens),
           "--runs", str(runs), "--threads", str(threads), "--dtype", run_dtype(model)]
    if options:
        cmd += ["--", json.dumps(options)]
    env = {**os.environ, "PYTHONPATH": str(sc.REPO), "TOKENIZERS_PARALLELISM": "false"}
    with bench_lock():
        if cap is not None:
            return run_worker(cmd, cap, timeout=timeout, env=env)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return {"status": "ok", **json.loads(line[len("BENCH_RESULT "):])}
    raise RuntimeError(f"{engine} on {model.name} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")


def sc_peers_no_repack() -> bool:
    """bench/peers.py already loads llama.cpp without its repacked layouts here (AMX CPUs)."""
    from bench.peers import cpu_has_amx

    return cpu_has_amx()


def speed(model: Path, vocab: int, prompts: list[int], tokens: int, runs: int, rounds: int,
          threads: int, cap: int | None = None, repack_probe_s: float = 0.0) -> dict[str, Any]:
    """Interleaved rounds of both engines; per engine and prompt length the per-run rates.
    ``cap``: every worker under that memory cap (moetier with ``max_ram`` = cap; llama.cpp
    first tried for at most ``repack_probe_s`` s as bench/peers.py decides, then, if that did
    not finish, with ``use_extra_bufts=False``)."""
    out: dict[str, Any] = {}
    options: dict[str, dict[str, Any] | None] = {"moetier": None, "llama_cpp": None}
    if cap is not None:
        options["moetier"] = sc.overcap_moetier_options(model, cap)
        if repack_probe_s and not sc_peers_no_repack():
            # llama.cpp as bench/peers.py decides (repacked layouts: anonymous copies of the
            # weights, which a cap below the file cannot hold): one bounded try, recorded
            ids = sc.prompt_ids(vocab, prompts[0])
            _log(f"llama_cpp with its repacked layouts under the cap: one try of at most {repack_probe_s:.0f} s")
            res = _worker("llama_cpp", model, ids, 2, 1, threads, cap, None, timeout=repack_probe_s)
            out["llama_cpp_repack_try"] = {k: res.get(k) for k in (
                "status", "returncode", "cgroup_peak_bytes", "wall_s", "use_extra_bufts", "load_s", "error")}
            _log(f"llama_cpp repacked: {res['status']} (peak {(res.get('cgroup_peak_bytes') or 0) / 1e9:.2f} GB)")
            if res["status"] == "ok":
                out.pop("llama_cpp_repack_try")
            else:
                options["llama_cpp"] = {"use_extra_bufts": False}  # llama.cpp's --no-repack
    for r in range(rounds):
        for n in prompts:
            ids = sc.prompt_ids(vocab, n)
            # decode is timed after the first prompt length only; longer prompts: prefill only
            steps = tokens if n == prompts[0] else 2
            for engine in ("moetier", "llama_cpp") if r % 2 == 0 else ("llama_cpp", "moetier"):
                t0, load0 = time.perf_counter(), os.getloadavg()[0]
                res = _worker(engine, model, ids, steps, runs, threads, cap, options[engine])
                eo = out.setdefault(engine, {})
                if res["status"] != "ok":
                    eo.setdefault("failures", []).append({k: res.get(k) for k in (
                        "status", "returncode", "cgroup_peak_bytes", "wall_s", "error")} | {"options": options[engine]})
                    _log(f"round {r}: {engine} prompt {n}: {res['status']} under the cap "
                         f"(peak {(res.get('cgroup_peak_bytes') or 0) / 1e9:.2f} GB)")
                    if engine == "llama_cpp" and res["status"] == "oom" and (options[engine] or {}).get(
                            "use_extra_bufts") is not False:  # repacked copies do not fit: --no-repack
                        options[engine] = {**(options[engine] or {}), "use_extra_bufts": False}
                        res = _worker(engine, model, ids, steps, runs, threads, cap, options[engine])
                    if res["status"] != "ok":
                        raise RuntimeError(f"{engine} on {model.name}: {res['status']}: {res.get('error', '')[-2000:]}")
                e = eo.setdefault(str(n), {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": [],
                                           "output_ids": None})
                e["prefill"] += res["prefill_tokens_per_s_runs"]
                e["prefill_cpu"] += res["prefill_tokens_per_cpu_s_runs"]
                if steps == tokens:
                    e["decode"] += res["decode_tokens_per_s_runs"]
                    e["decode_cpu"] += res["decode_tokens_per_cpu_s_runs"]
                    e["output_ids"] = res["output_ids"]
                for k in ("decode_path", "native_reason", "compute_paths", "use_extra_bufts", "system_info"):
                    if k in res:
                        eo[k] = res[k]
                eo.setdefault("workers", []).append(
                    {"round": r, "prompt": n, "options": options[engine], "loadavg_1min": [load0, os.getloadavg()[0]],
                     **{k: res.get(k) for k in ("peak_rss_bytes", "cgroup_peak_bytes", "page_cache_dropped",
                                                "load_s", "first_run", "hierarchy", "worker_wall_s")
                        if res.get(k) is not None}})
                pre, dec = (statistics.median(res[f"{k}_tokens_per_s_runs"]) for k in ("prefill", "decode"))
                _log(f"round {r}: {engine} prompt {n}: prefill {pre:.1f} decode {dec:.2f} tok/s "
                     f"({time.perf_counter() - t0:.0f} s" + (f", cgroup peak {res['cgroup_peak_bytes'] / 1e9:.2f} GB"
                                                             if res.get("cgroup_peak_bytes") else "") + ")")
    return out


def accuracy(model: Path, vocab: int, n_prompt: int, tokens: int, threads: int) -> dict[str, Any]:
    """Decode-path logits of both engines along moetier's greedy continuation vs the
    dequantized float32 model (moetier's torch path on the same file)."""
    import numpy as np
    import torch

    import moetier

    ids = sc.prompt_ids(vocab, n_prompt)
    m = moetier.load(str(model), dtype="float32", tokenizer=False, threads=threads)
    assert m.net.native is not None, m.native_reason
    seq = m.new_sequence(capacity=n_prompt + tokens + 1)
    rows = [m.step([(seq, ids)])[0]]  # prompt: one forward (the prefill path)
    cont: list[int] = []
    for _ in range(tokens - 1):
        cont.append(int(rows[-1].argmax()))
        rows.append(m.step([(seq, [cont[-1]])])[0])  # native decode steps
    cont.append(int(rows[-1].argmax()))
    ours = torch.stack(rows)
    del m
    ref_m = moetier.load(str(model), dtype="float32", tokenizer=False, threads=threads, native=False)
    ref = ref_m.logits(ids + cont[:-1])[n_prompt - 1:]  # [tokens, V]: every weight gguf-dequantized, f32
    del ref_m
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "llama.npy"
        p = subprocess.run([str(sc.llama_python()), str(sc.PEERS), "logits", str(model), "--prompt-ids",
                            ",".join(map(str, ids)), "--continuation", ",".join(map(str, cont[:-1])),
                            "--threads", str(threads), "--out", str(f)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp logits failed:\n{p.stderr[-2000:]}")
        llama = torch.from_numpy(np.load(f))
    scale = ref.abs().max().item()
    d_ours = (ours - ref).abs().max().item()
    d_llama = (llama - ref).abs().max().item()
    return {
        "prompt_tokens": n_prompt, "positions": tokens, "ref_max_abs_logit": scale,
        "moetier_max_abs_dlogit": d_ours, "llama_cpp_max_abs_dlogit": d_llama,
        "moetier_vs_llama_cpp_max_abs_dlogit": (ours - llama).abs().max().item(),
        "greedy_continuation": cont,
        "moetier_argmax_equals_ref": int((ours.argmax(-1) == ref.argmax(-1)).sum()),
        "llama_cpp_argmax_equals_ref": int((llama.argmax(-1) == ref.argmax(-1)).sum()),
    }


def planner_bound(model: Path, threads: int, context: int, refresh: bool = False) -> dict[str, Any]:
    """The planner's batch-1 decode bound for the GGUF file in RAM on the probed CPU as a run on
    ``threads`` cores sees it (one core's memory read at 1), at the file's own block types and
    bytes (``moetier plan MODEL.gguf``)."""
    from moetier.planner.probe import cpu_machine
    from moetier.planner.roofline import plan
    from moetier.spec import load_spec
    from moetier.weights.gguf_io import file_precision

    spec = load_spec(model)
    m = cpu_machine(refresh=refresh, cores=threads)
    r = plan(spec, m, context=context, precision=file_precision(model, spec))
    return {"decode_tokens_per_s": float(r.decode_tokens_per_s), "binds_on": r.bottleneck,
            "memory_s": float(r.decode.memory_s), "kernel_s": float(r.decode.kernel_s),
            "memory_alone_tokens_per_s": 1.0 / float(r.decode.memory_s),
            "memory_read_bw": float(m.tier("dram").read_bw), "cores": threads}


def _summary(engine_res: dict[str, Any], n: str, key: str) -> dict[str, float] | None:
    v = engine_res.get(n, {}).get(key) or []
    return {"median": statistics.median(v), "best": max(v), "runs": len(v)} if v else None


def ratios(sp: dict[str, Any], prompts: list[int]) -> dict[str, Any]:
    out = {}
    for n in prompts:
        for key in ("prefill", "decode", "prefill_cpu", "decode_cpu"):
            a, b = _summary(sp["moetier"], str(n), key), _summary(sp["llama_cpp"], str(n), key)
            if a and b:
                out[f"{key}_{n}"] = {"moetier": a, "llama_cpp": b, "ratio_median": a["median"] / b["median"],
                                     "ratio_best": a["best"] / b["best"]}
    return out


def _rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"  # under a cap, decode rates are ~0.4 tok/s


def render(doc: dict[str, Any]) -> str:
    """The README table (markdown) from the results JSON: per rate, moetier / llama.cpp medians
    and their ratio, per wall second and per CPU second of the engine's process."""
    cols = []
    p0, p1 = doc["prompts"][0], doc["prompts"][-1]
    for key, title in ((f"decode_{p0}", "decode"), (f"prefill_{p0}", f"prefill {p0}"),
                       (f"prefill_{p1}", f"prefill {p1}")):
        if title == f"prefill {p1}" and p1 == p0:
            continue
        cols += [(key, f"{title} tok/s"), (key.replace("_", "_cpu_", 1), f"{title} tok/CPU-s")]
    head = ("| model | type | GB | threads | " + " | ".join(t for _, t in cols) +
            " | moetier decode of the planner's bound | same greedy tokens "
            "| max abs dlogit vs f32 (moetier / llama.cpp) |")
    lines = [head, "|" + "---|" * (len(cols) + 7)]
    for row in doc["rows"]:
        r = row["ratios"]
        cells = []
        for key, _ in cols:
            x = r.get(key)
            cells.append("-" if x is None else f"{_rate(x['moetier']['median'])} / "
                         f"{_rate(x['llama_cpp']['median'])} ({x['ratio_median']:.2f}x)")
        acc = row.get("accuracy") or {}
        dl = f"{acc['moetier_max_abs_dlogit']:.2g} / {acc['llama_cpp_max_abs_dlogit']:.2g}" if acc else "-"
        same = row.get("same_greedy_tokens")
        threads = row.get("settings", {}).get("threads", doc.get("threads", "-"))
        model = row["scenario"]
        if row.get("cap_bytes"):  # (c): the cgroup cap both engines ran under
            model += f" (cap {row['cap_bytes'] / sc.GIB:.2f} GiB = file / {row['file_bytes'] / row['cap_bytes']:.1f})"
        pl = row.get("planner") or {}
        bound = (f"{pl['fraction_of_bound']:.0%} of {_rate(pl['decode_tokens_per_s'])} ({pl['binds_on']}; "
                 f"memory alone {_rate(pl['memory_alone_tokens_per_s'])})" if "fraction_of_bound" in pl else "-")
        lines.append(f"| {model} | {row['type']} | {row['file_bytes'] / 1e9:.2f} | {threads} | "
                     + " | ".join(cells) + f" | {bound} | {'-' if same is None else 'yes' if same else 'no'} | {dl} |")
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- gguf-table:begin -->", "<!-- gguf-table:end -->"


def write_readme(doc: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    block = f"{README_BEGIN}\n{render(doc)}{README_END}"
    if README_BEGIN in text:
        pre, rest = text.split(README_BEGIN, 1)
        text = pre + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def _merged(out: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's rows plus the rows of ``out`` (an earlier run) for other (scenario, type)
    pairs, each carrying its own run settings, in scenario/type order."""
    rows = {(r["scenario"], r["type"]): r for r in doc["rows"]}
    for r in doc["rows"]:
        r.setdefault("settings", {k: doc[k] for k in ("threads", "prompts", "tokens", "runs", "rounds", "date",
                                                      "load_avg_start")})
    if out.exists():
        for r in json.loads(out.read_text()).get("rows", []):
            rows.setdefault((r["scenario"], r["type"]), r)
    order = {n: i for i, n in enumerate([*SOURCES, *sc.EXTRA_SCENARIOS])}
    return sorted(rows.values(), key=lambda r: (order.get(r["scenario"], 99), r["type"] != "Q8_0", r["type"]))


def combined(paths: list[Path]) -> dict[str, Any]:
    """One table's document from several results JSONs: the first's fields, every file's rows
    (each with its own settings), first file's row winning for a repeated (scenario, type)."""
    docs = [json.loads(p.read_text()) for p in paths]
    seen: set[tuple[str, str]] = set()
    rows = []
    for d in docs:
        for r in d.get("rows", []):
            if (r["scenario"], r["type"]) not in seen:
                seen.add((r["scenario"], r["type"]))
                rows.append(r)
    return {**docs[0], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="embedded,ram")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default="64,512")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="timed generations per worker")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (order alternates)")
    ap.add_argument("--accuracy", default="embedded", help="scenarios whose logits are compared ('' = none)")
    ap.add_argument("--out", default=str(sc.REPO / "bench" / "results" / "gguf.json"))
    ap.add_argument("--prepare-only", action="store_true", help="only make the GGUF files")
    ap.add_argument("--report", default=None,
                    help="only render the README table from these JSONs (comma-separated; rows in that order)")
    ap.add_argument("--readme-with", default="",
                    help="after a run, the README table also gets the rows of these JSONs (comma-separated)")
    ap.add_argument("--repack-try-s", type=float, default=180.0,
                    help="under a cap: seconds llama.cpp gets with its repacked layouts before --no-repack")
    ap.add_argument("--cap", type=lambda x: int(float(x)), default=None,
                    help="scenario cap: memory cap in bytes (default: choose_cap)")
    a = ap.parse_args(argv)
    readme = sc.REPO / "bench" / "README.md"
    if a.report:
        write_readme(combined([Path(x) for x in a.report.split(",")]), readme)
        return 0
    prompts = [int(x) for x in a.prompts.split(",")]
    doc: dict[str, Any] = {"host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "load_avg_start": os.getloadavg(), "threads": a.threads, "prompts": prompts,
                           "tokens": a.tokens, "runs": a.runs, "rounds": a.rounds,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    for name in a.scenarios.split(","):
        for t in a.types.split(","):
            f = scenario_file(name, t)
            _log(f"{name} {t}: {f} ({f.stat().st_size / 1e9:.3f} GB)")
            if a.prepare_only:
                continue
            import gguf

            r = gguf.GGUFReader(f)
            vocab = len(r.fields["tokenizer.ggml.tokens"].data)
            types = sorted({x.tensor_type.name for x in r.tensors})
            del r
            row: dict[str, Any] = {"scenario": name, "type": t, "file": f.name, "file_bytes": f.stat().st_size,
                                   "tensor_types": types}
            cap = None
            if name == "cap" or a.cap:
                smallest = moetier_smallest_max_ram(f, a.threads)
                cap = a.cap or choose_cap(f.stat().st_size, smallest)
                row.update(cap_bytes=cap, moetier_smallest_max_ram=smallest,
                           file_over_cap=f.stat().st_size / cap, moetier_options=sc.overcap_moetier_options(f, cap))
                _log(f"cap {cap / sc.GIB:.3f} GiB (file / {f.stat().st_size / cap:.2f}; moetier's smallest "
                     f"--max-ram {'?' if smallest is None else f'{smallest / 1e9:.2f} GB'})")
            sp = speed(f, vocab, prompts, a.tokens, a.runs, a.rounds, a.threads, cap,
                       repack_probe_s=a.repack_try_s if cap is not None else 0.0)
            row["speed"] = sp
            row["ratios"] = ratios(sp, prompts)
            if cap is None:  # in RAM: the planner's bound after a fresh probe (a cap's bound is the store's)
                row["planner"] = planner_bound(f, a.threads, prompts[0] + a.tokens // 2, refresh=True)
                d = row["ratios"].get(f"decode_{prompts[0]}")
                if d:
                    row["planner"]["fraction_of_bound"] = d["moetier"]["median"] / row["planner"]["decode_tokens_per_s"]
            o_m, o_l = sp["moetier"][str(prompts[0])]["output_ids"], sp["llama_cpp"][str(prompts[0])]["output_ids"]
            row["same_greedy_tokens"] = o_m == o_l
            row["greedy_tokens_equal_prefix"] = next((i for i, (x, y) in enumerate(zip(o_m, o_l)) if x != y),
                                                     len(o_m))
            if name in a.accuracy.split(","):
                row["accuracy"] = accuracy(f, vocab, prompts[0], a.tokens, a.threads)
            doc["rows"].append(row)
            doc["rows"] = _merged(Path(a.out), doc)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    if not a.prepare_only:
        doc["load_avg_end"] = os.getloadavg()
        doc["rows"] = _merged(Path(a.out), doc)
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        table = combined([Path(a.out), *(Path(x) for x in a.readme_with.split(",") if x)])
        write_readme(table, readme)
        print(render(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
