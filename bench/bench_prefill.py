"""Prefill speed: moetier's native multi-token path vs its torch path (and llama.cpp), side by side.

    python -m bench.bench_prefill [--models embedded,ram] [--tokens 64,512] [--runs 5] [--threads 2]
                                  [--skip-llama] [--name prefill]   # -> bench/results/<name>.json

Models: ``embedded`` (moetier/data/embedded) and ``ram`` (the ~2.5 GB bf16 synthetic Qwen3-MoE of
``bench.bench_runtime.ensure_synthetic``). One moetier model per checkpoint: each run prefills a
fresh sequence with the same seeded prompt on the native path, then on the torch path (the
decoder detached for that call), alternating, so both see the same machine state; the ratio is
taken per run pair and its median reported. llama.cpp (``bench/peers.py llama_cpp`` in its own venv,
``bench.scenarios.llama_python``; GGUF of the same weights at bf16) runs right after, same prompt ids and
threads, when that venv exists (it is never built here). prefill tok/s = prompt tokens / wall time of
the one forward that returns the last token's logits (``bench/peers.py``'s definition).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import median, write_result

REPO = Path(__file__).resolve().parent.parent


def model_dir(name: str) -> Path:
    if name == "embedded":
        return REPO / "moetier" / "data" / "embedded"
    if name == "ram":
        from bench.bench_runtime import ensure_synthetic

        return ensure_synthetic(2.5)
    return Path(name)


def moetier_runs(path: Path, tokens: list[int], runs: int, threads: int) -> dict[int, dict[str, Any]]:
    import moetier

    m = moetier.load(path, tokenizer=False, threads=threads)
    dec = m.net.native
    assert dec is not None and hasattr(dec, "step_many"), m.compute_paths()
    out: dict[int, dict[str, Any]] = {}
    for T in tokens:
        ids = torch.randint(10, m.spec.vocab_size, (T,), generator=torch.Generator().manual_seed(T)).tolist()
        rates: dict[str, list[float]] = {"native": [], "torch": []}
        last: dict[str, torch.Tensor] = {}
        for r in range(runs + 1):  # run 0: warm-up (first-touch allocations), not reported
            for path_name in ("native", "torch"):
                m.net.native = dec if path_name == "native" else None
                seq = m.new_sequence(capacity=T + 1)
                t0 = time.perf_counter()
                last[path_name] = m.step([(seq, ids)])
                dt = time.perf_counter() - t0
                if r:
                    rates[path_name].append(T / dt)
        m.net.native = dec
        ratios = [a / b for a, b in zip(rates["native"], rates["torch"], strict=True)]
        out[T] = {"native_tok_s": median(rates["native"]), "torch_tok_s": median(rates["torch"]),
                  "native_over_torch": median(ratios), "native_runs": rates["native"], "torch_runs": rates["torch"],
                  "max_abs_logit_diff_native_vs_torch": (last["native"] - last["torch"]).abs().max().item(),
                  "dtype": str(m.dtype).replace("torch.", "")}
        print(f"  {path.name} T={T}: native {out[T]['native_tok_s']:.0f} tok/s, torch {out[T]['torch_tok_s']:.0f} "
              f"tok/s, native/torch {out[T]['native_over_torch']:.2f}", file=sys.stderr, flush=True)
    return out


def llama_runs(path: Path, tokens: list[int], runs: int, threads: int, vocab: int) -> dict[int, float] | None:
    from bench.scenarios import bench_cache, ensure_gguf

    py = bench_cache() / "llama-venv" / "bin" / "python"
    if not py.exists():
        return None
    gguf = ensure_gguf(path, "bf16")
    out = {}
    for T in tokens:
        ids = torch.randint(10, vocab, (T,), generator=torch.Generator().manual_seed(T)).tolist()
        cmd = [str(py), str(REPO / "bench" / "peers.py"), "llama_cpp", str(gguf), "--prompt-ids",
               ",".join(map(str, ids)), "--tokens", "1", "--runs", str(runs), "--threads", str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
        if line is None:
            print(f"  llama.cpp failed on {gguf}: {p.stderr[-500:]}", file=sys.stderr)
            return None
        out[T] = median(json.loads(line[len("BENCH_RESULT "):])["prefill_tokens_per_s_runs"])
        print(f"  llama.cpp {path.name} T={T}: {out[T]:.0f} tok/s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,ram")
    ap.add_argument("--tokens", default="64,512")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--name", default="prefill", help="result file bench/results/<name>.json")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    results = []
    for name in a.models.split(","):
        path = model_dir(name)
        res = moetier_runs(path, tokens, a.runs, a.threads)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        llama = None if a.skip_llama else llama_runs(path, tokens, a.runs, a.threads, vocab)
        for T, r in res.items():
            if llama:
                r["llama_cpp_tok_s"] = llama[T]
                r["native_over_llama_cpp"] = r["native_tok_s"] / llama[T]
            results.append({"model": name, "tokens": T, **r})
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    write_result(a.name, {
        "benchmark": "prefill tok/s: moetier native multi-token path vs its torch path vs llama.cpp",
        "command": "python -m bench.bench_prefill " + " ".join(sys.argv[1:]),
        "threads": a.threads, "runs": a.runs, "loadavg_1m_after": float(load), "results": results,
    })
    for r in results:
        extra = f"  llama.cpp {r['llama_cpp_tok_s']:.0f}  native/llama.cpp {r['native_over_llama_cpp']:.2f}" \
            if "llama_cpp_tok_s" in r else ""
        print(f"{r['model']:9s} T={r['tokens']:4d}  native {r['native_tok_s']:7.0f}  torch {r['torch_tok_s']:7.0f}  "
              f"native/torch {r['native_over_torch']:.2f}{extra}")


if __name__ == "__main__":
    main()
