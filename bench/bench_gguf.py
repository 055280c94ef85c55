"""moetier vs llama.cpp on the SAME GGUF file: speed, greedy tokens, and distance to the float model.

    python -m bench.bench_gguf [--scenarios embedded,ram] [--types Q8_0,Q4_K_M] [--threads 2]
                               [--prompts 64,512] [--tokens 32] [--rounds 2] [--out bench/results/gguf.json]
    python -m bench.bench_gguf --report bench/results/gguf.json   # the README table from the JSON

Files: each scenario's checkpoint (``bench/scenarios.py``: (a) the embedded model, (b) the
2.5 GB synthetic Qwen3-MoE) converted by llama.cpp's ``convert_hf_to_gguf.py`` at bf16, then
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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scenarios as sc

TYPES = ("Q8_0", "Q4_K_M")


def _log(msg: str) -> None:
    print(f"[bench_gguf] {msg}", file=sys.stderr, flush=True)


def ensure_quantized(src: Path, recipe: str) -> Path:
    """``src`` (a bf16 GGUF) quantized by llama.cpp to ``recipe`` (cached next to it)."""
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


def scenario_file(name: str, recipe: str) -> Path:
    s = {**sc.SCENARIOS, **sc.EXTRA_SCENARIOS}[name]
    return ensure_quantized(sc.ensure_gguf(s.resolve(), "bf16"), recipe)


def _worker(engine: str, model: Path, ids: list[int], tokens: int, runs: int, threads: int) -> dict[str, Any]:
    py = str(sc.llama_python()) if engine == "llama_cpp" else sys.executable
    cmd = [py, str(sc.PEERS), "moetier_steps" if engine == "moetier" else engine, str(model),
           "--prompt-ids", ",".join(map(str, ids)), "--tokens", str(tokens),
           "--runs", str(runs), "--threads", str(threads), "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(sc.REPO), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"{engine} on {model.name} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")


def speed(model: Path, vocab: int, prompts: list[int], tokens: int, runs: int, rounds: int,
          threads: int) -> dict[str, Any]:
    """Interleaved rounds of both engines; per engine and prompt length the per-run rates."""
    out: dict[str, Any] = {}
    for r in range(rounds):
        for n in prompts:
            ids = sc.prompt_ids(vocab, n)
            # decode is timed after the first prompt length only; longer prompts: prefill only
            steps = tokens if n == prompts[0] else 2
            for engine in ("moetier", "llama_cpp") if r % 2 == 0 else ("llama_cpp", "moetier"):
                t0 = time.perf_counter()
                res = _worker(engine, model, ids, steps, runs, threads)
                e = out.setdefault(engine, {}).setdefault(str(n), {"prefill": [], "decode": [], "prefill_cpu": [],
                                                                   "decode_cpu": [], "output_ids": None})
                e["prefill"] += res["prefill_tokens_per_s_runs"]
                e["prefill_cpu"] += res["prefill_tokens_per_cpu_s_runs"]
                if steps == tokens:
                    e["decode"] += res["decode_tokens_per_s_runs"]
                    e["decode_cpu"] += res["decode_tokens_per_cpu_s_runs"]
                    e["output_ids"] = res["output_ids"]
                for k in ("decode_path", "native_reason", "compute_paths", "use_extra_bufts", "system_info"):
                    if k in res:
                        out[engine][k] = res[k]
                pre, dec = (statistics.median(res[f"{k}_tokens_per_s_runs"]) for k in ("prefill", "decode"))
                _log(f"round {r}: {engine} prompt {n}: prefill {pre:.1f} decode {dec:.1f} tok/s "
                     f"({time.perf_counter() - t0:.0f} s)")
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
            " | same greedy tokens | max abs dlogit vs f32 (moetier / llama.cpp) |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for row in doc["rows"]:
        r = row["ratios"]
        cells = []
        for key, _ in cols:
            x = r.get(key)
            cells.append("-" if x is None else
                         f"{x['moetier']['median']:.1f} / {x['llama_cpp']['median']:.1f} ({x['ratio_median']:.2f}x)")
        acc = row.get("accuracy") or {}
        dl = f"{acc['moetier_max_abs_dlogit']:.2g} / {acc['llama_cpp_max_abs_dlogit']:.2g}" if acc else "-"
        same = row.get("same_greedy_tokens")
        threads = row.get("settings", {}).get("threads", doc.get("threads", "-"))
        lines.append(f"| {row['scenario']} | {row['type']} | {row['file_bytes'] / 1e9:.2f} | {threads} | "
                     + " | ".join(cells) + f" | {'-' if same is None else 'yes' if same else 'no'} | {dl} |")
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
    order = {n: i for i, n in enumerate([*sc.SCENARIOS, *sc.EXTRA_SCENARIOS])}
    return sorted(rows.values(), key=lambda r: (order.get(r["scenario"], 99), r["type"] != "Q8_0", r["type"]))


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
    ap.add_argument("--report", default=None, help="only render README table from this JSON")
    a = ap.parse_args(argv)
    readme = sc.REPO / "bench" / "README.md"
    if a.report:
        write_readme(json.loads(Path(a.report).read_text()), readme)
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
            sp = speed(f, vocab, prompts, a.tokens, a.runs, a.rounds, a.threads)
            row["speed"] = sp
            row["ratios"] = ratios(sp, prompts)
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
        write_readme(doc, readme)
        print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
