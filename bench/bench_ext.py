"""gpt-oss and Llama-4: moetier's native path vs its torch path, side by side in one run --
prefill, single-sequence decode and batched decode.

    python -m bench.bench_ext [--tokens 64,512] [--runs 3] [--threads 2] [--decode 32] [--batch 8]
                              [--name ext]   # -> bench/results/<name>.json

Checkpoints: random-weight gpt-oss (bf16; and the same with MXFP4 experts, the release layout) and
Llama-4 written by the test helpers at a small but not tiny shape (hidden 512, 4 layers, 16
experts, head_dim 64, sliding window / attention chunk 128, so 512-token prompts cross them).
One model per checkpoint; the native decoder is detached for the torch runs, native and torch
runs alternate so both see the same machine state. Prefill: ``bench.bench_prefill.moetier_runs``
(a fresh sequence per run, tok/s = prompt tokens / wall time of the one forward). Decode: a
64-token prompt, then ``--decode`` greedy single-token steps (tok/s over the steps). Batch:
``--batch`` sequences with 32-token prompts, then 8 batched steps of one token each (tok/s =
tokens produced / wall time of the steps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_prefill import moetier_runs
from bench.common import median, write_result

BASE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            intermediate_size=512, num_local_experts=16, vocab_size=4096)
SHAPES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "gpt_oss": ("gpt_oss", None, dict(BASE, num_experts_per_tok=4, sliding_window=128)),
    "gpt_oss_mxfp4": ("gpt_oss", "mxfp4", dict(BASE, num_experts_per_tok=4, sliding_window=128)),
    "llama4": ("llama4", None, dict(BASE, num_experts_per_tok=1, intermediate_size_mlp=1024,
                                    attention_chunk_size=128)),
}


def make(tmp: Path, name: str) -> Path:
    import tests.helpers.moe_families  # noqa: F401  (registers the gpt_oss / llama4 recipes)
    from tests.helpers.checkpoints import make_tiny_checkpoint
    from tests.helpers.quantized import make_quantized_checkpoint

    fam, quant, shape = SHAPES[name]
    if quant:
        return make_quantized_checkpoint(tmp / name, fam, quant, tokenizer=False, dtype=torch.bfloat16, **shape)
    return make_tiny_checkpoint(tmp / name, fam, tokenizer=False, dtype=torch.bfloat16, **shape)


def decode_runs(path: Path, runs: int, threads: int, steps: int, batch: int) -> dict[str, Any]:
    """Single-sequence and batched decode tok/s, native vs torch (alternating per run)."""
    import moetier

    m = moetier.load(path, tokenizer=False, threads=threads)
    dec = m.net.native
    V = m.spec.vocab_size
    prompt = [(7 * i + 5) % V for i in range(64)]
    rates: dict[str, list[float]] = {k: [] for k in ("native", "torch", "batch_native", "batch_torch")}
    for r in range(runs + 1):  # run 0: warm-up
        for name in ("native", "torch"):
            m.net.native = dec if name == "native" else None
            seq = m.new_sequence()
            tok = int(m.step([(seq, prompt)])[0].argmax())
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = int(m.step([(seq, [tok])])[0].argmax())
            dt = time.perf_counter() - t0
            seqs = [m.new_sequence() for _ in range(batch)]
            out = m.step([(s, prompt[i:i + 32]) for i, s in enumerate(seqs)])
            t0 = time.perf_counter()
            for _ in range(8):
                out = m.step([(s, [int(out[i].argmax())]) for i, s in enumerate(seqs)])
            db = time.perf_counter() - t0
            if r:
                rates[name].append(steps / dt)
                rates[f"batch_{name}"].append(8 * batch / db)
    m.net.native = dec
    res = {f"{k}_tok_s": median(v) for k, v in rates.items()}
    res["decode_native_over_torch"] = median([a / b for a, b in zip(rates["native"], rates["torch"], strict=True)])
    res["batch_native_over_torch"] = median(
        [a / b for a, b in zip(rates["batch_native"], rates["batch_torch"], strict=True)])
    res["runs"] = rates
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="64,512")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32, help="greedy single-token steps timed")
    ap.add_argument("--batch", type=int, default=8, help="sequences of the batched steps")
    ap.add_argument("--name", default="ext", help="result file bench/results/<name>.json")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            path = make(Path(tmp), name)
            prefill = moetier_runs(path, tokens, a.runs, a.threads)
            decode = decode_runs(path, a.runs, a.threads, a.decode, a.batch)
            results.append({"model": name, "shape": SHAPES[name][2], "experts": SHAPES[name][1] or "bf16",
                            "prefill": {str(t): r for t, r in prefill.items()}, "decode": decode})
            print(f"  {name}: decode native {decode['native_tok_s']:.1f} torch {decode['torch_tok_s']:.1f} tok/s; "
                  f"batch x{a.batch} native {decode['batch_native_tok_s']:.1f} torch "
                  f"{decode['batch_torch_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    write_result(a.name, {
        "benchmark": "gpt-oss / Llama-4: native vs torch path, prefill, decode and batched decode tok/s",
        "command": "python -m bench.bench_ext " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": a.threads, "runs": a.runs, "loadavg_1m_after": float(load), "results": results,
    })
    for r in results:
        for T, p in r["prefill"].items():
            print(f"{r['model']:14s} prefill T={T:>4s}  native {p['native_tok_s']:7.0f}  torch {p['torch_tok_s']:7.0f}"
                  f"  native/torch {p['native_over_torch']:.2f}")
        d = r["decode"]
        print(f"{r['model']:14s} decode           native {d['native_tok_s']:7.1f}  torch {d['torch_tok_s']:7.1f}"
              f"  native/torch {d['decode_native_over_torch']:.2f}")
        print(f"{r['model']:14s} batch x{a.batch:<2d}         native {d['batch_native_tok_s']:7.1f}  torch "
              f"{d['batch_torch_tok_s']:7.1f}  native/torch {d['batch_native_over_torch']:.2f}")


if __name__ == "__main__":
    main()
