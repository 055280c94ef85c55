"""Decode speed and bytes per token of the quantized formats vs the plain model (torch path).

    python -m bench.bench_quant_decode [--tokens 32] [--runs 3] [--threads 1]

The embedded model, all variants loaded in one process and timed side by side (round robin,
median of ``--runs``): plain float32 and bf16 (torch path and native), and the routed experts
quantized at load to int8 g128 / fp8 128x128 / int4 g32, the rest bf16 (torch path: each
expert is dequantized per use and multiplied in float32 — the native kernels for these formats
come with the kernels branch). ``bytes/token`` is what one decoded token reads: always-on weights
+ top_k experts per MoE layer in their stored format. Writes ``bench/results/quant_decode_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import moetier

RESULTS = Path(__file__).parent / "results" / "quant_decode_torch.json"


def bytes_per_token(m) -> int:
    s = m.spec
    expert = m.provider.get(s.moe_layer_ids[0], 0).nbytes
    return m.net.dense_bytes_per_token() + s.num_moe_layers * s.top_k * expert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "bf16 native": dict(dtype="bfloat16"),
        "bf16 torch": dict(dtype="bfloat16", native=False),
        "fp32 torch": dict(dtype="float32", native=False),
        "int8 g128 experts, torch": dict(dtype="bfloat16", quantize="int8", quantize_group=128),
        "fp8 experts, torch": dict(dtype="bfloat16", quantize="fp8"),
        "int4 g32 experts, torch": dict(dtype="bfloat16", quantize="int4", quantize_group=32),
    }
    models = {k: moetier.load(None, **kw) for k, kw in variants.items()}
    prompt = list(range(10, 26))
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.generate_ids(prompt, max_tokens=4)  # warm-up
    for _ in range(args.runs):
        for k, m in models.items():
            r = m.generate_ids(prompt, max_tokens=args.tokens, stop_ids=[])
            times[k].append(r.decode_steps / r.decode_s)
    rows = []
    for k, m in models.items():
        rows.append({"variant": k, "decode_tok_s": round(statistics.median(times[k]), 2),
                     "bytes_per_token": bytes_per_token(m), "path": "native" if m.native_reason is None else "torch"})
    base = next(r for r in rows if r["variant"] == "bf16 torch")
    for r in rows:
        r["vs_bf16_torch"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2)
        print(r)
    RESULTS.write_text(json.dumps({"model": "embedded", "threads": args.threads, "tokens": args.tokens,
                                   "runs": args.runs, "rows": rows}, indent=2) + "\n")
    print("\n| variant | bytes/token | decode tok/s | vs bf16 torch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes_per_token'] / 1e6:.2f} MB | {r['decode_tok_s']:.1f} | "
              f"{r['vs_bf16_torch']:.2f}x |")


if __name__ == "__main__":
    main()
