"""Decode speed at batch 1 vs the memory roofline, moetier vs transformers eager.

    python -m bench.bench_runtime [--size-gb 2.5] [--runs 5] [--tokens 32] [--skip-hf]

Models: the embedded model (when ``moetier/data/embedded/`` exists) and a synthetic
Qwen3-MoE checkpoint of ``--size-gb`` GB in bf16 with random weights, written once to the
cache dir (``$MOETIER_CACHE_DIR`` or ``~/.cache/moetier/bench``; never committed).

For each model and dtype: median over ``--runs`` of decode tokens/s (``--tokens`` greedy
steps after a short prompt), bytes read per decode token (always-on weights + the routed
experts actually selected, counted with a router observer, + KV cache reads), achieved
bandwidth = bytes/token x tokens/s, and its fraction of the measured memory read
bandwidth (planner probe's reduction pass). Memory is pre-touched (a warm-up generation)
before timing. transformers runs the same checkpoint in eager mode, same prompt, greedy,
``generate(max_new_tokens=..)``; its decode rate is timed between the first and the last
new token with a streamer (same definition as moetier's: single-token forwards per second).

Results: ``bench/results/runtime_decode.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import median, write_result


def cache_root() -> Path:
    env = os.environ.get("MOETIER_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "moetier") / "bench"


def synthetic_config(size_gb: float) -> dict[str, Any]:
    """A Qwen3-30B-A3B-shaped model scaled down so that the bf16 checkpoint is ~size_gb."""
    hidden, heads, kv, head_dim, experts, top_k, inter, vocab = 1024, 16, 4, 64, 64, 8, 384, 32000
    per_layer = (
        hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o, k, v
        + 3 * hidden * inter * experts + experts * hidden + 2 * hidden + 2 * head_dim
    )
    layers = max(2, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 3072,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": None,
        "eos_token_id": None,
        "attention_bias": False,
        "use_sliding_window": False,
    }


def write_synthetic(directory: Path, cfg: dict[str, Any], seed: int = 0) -> None:
    """Random bf16 weights in HF's per-expert layout, one shard per ~512 MB."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]

    def w(*shape: int, std: float | None = None) -> torch.Tensor:
        s = std if std is not None else 1.0 / math.sqrt(shape[-1])
        return (torch.randn(shape, generator=g) * s).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{
        "model.embed_tokens.weight": w(V, H, std=1.0),
        "model.norm.weight": ones(H),
        "lm_head.weight": w(V, H),
    }]
    for i in range(L):
        p = f"model.layers.{i}"
        d = {
            f"{p}.input_layernorm.weight": ones(H),
            f"{p}.post_attention_layernorm.weight": ones(H),
            f"{p}.self_attn.q_proj.weight": w(nh * hd, H),
            f"{p}.self_attn.k_proj.weight": w(kv * hd, H),
            f"{p}.self_attn.v_proj.weight": w(kv * hd, H),
            f"{p}.self_attn.o_proj.weight": w(H, nh * hd),
            f"{p}.self_attn.q_norm.weight": ones(hd),
            f"{p}.self_attn.k_norm.weight": ones(hd),
            f"{p}.mlp.gate.weight": w(E, H, std=4.0 / math.sqrt(H)),
        }
        for e in range(E):
            d[f"{p}.mlp.experts.{e}.gate_proj.weight"] = w(I, H)
            d[f"{p}.mlp.experts.{e}.up_proj.weight"] = w(I, H)
            d[f"{p}.mlp.experts.{e}.down_proj.weight"] = w(H, I)
        shards.append(d)
    # merge layers into ~512 MB shards
    merged: list[dict[str, torch.Tensor]] = []
    cur: dict[str, torch.Tensor] = {}
    for d in shards:
        cur.update(d)
        if sum(t.numel() * 2 for t in cur.values()) > 512e6:
            merged.append(cur)
            cur = {}
    if cur:
        merged.append(cur)
    n = len(merged)
    weight_map = {}
    for k, d in enumerate(merged):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(d, directory / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in d})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))


def ensure_synthetic(size_gb: float) -> Path:
    cfg = synthetic_config(size_gb)
    d = cache_root() / f"synthetic-qwen3moe-L{cfg['num_hidden_layers']}"
    if not (d / "config.json").exists():
        print(f"writing synthetic checkpoint to {d} ...", file=sys.stderr)
        write_synthetic(d, cfg)
    return d


def memory_bandwidth() -> float:
    from moetier.planner.probe import measure_memory_bw

    return measure_memory_bw(1024 * 2**20, 5)[1]  # all cores


# ---------------------------------------------------------------------------------------


def bench_moetier(path: Path, dtype: str, runs: int, tokens: int, prompt: list[int]) -> dict[str, Any]:
    import moetier

    t0 = time.perf_counter()
    m = moetier.load(path, dtype=dtype, tokenizer=False)
    load_s = time.perf_counter() - t0
    spec = m.spec
    elt = torch.empty(0, dtype=m.dtype).element_size()
    expert_bytes = 3 * spec.hidden_size * spec.expert_intermediate_size * elt
    dense_bytes = m.net.dense_bytes_per_token()

    # count the unique experts read per decode step with a router observer (batch 1: T == 1)
    uniq: list[int] = []

    def obs(layer: int, ids: torch.Tensor, w: torch.Tensor) -> None:
        if ids.shape[0] == 1:
            uniq.append(len(set(ids[0].tolist())))

    m.generate_ids(prompt, max_tokens=tokens)  # warm-up: page in, allocate
    rates, routed = [], []
    for _ in range(runs):
        m.add_router_observer(obs)
        uniq.clear()
        res = m.generate_ids(prompt, max_tokens=tokens)
        m.remove_router_observer(obs)
        steps = res.decode_steps
        routed.append(sum(uniq) / max(steps, 1) * expert_bytes)
        # timed run without the observer
        res = m.generate_ids(prompt, max_tokens=tokens)
        rates.append(res.decode_tokens_per_s)
    ctx = len(prompt) + tokens / 2
    kv_bytes = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * elt * ctx
    bytes_per_token = dense_bytes + median(routed) + kv_bytes
    tps = median(rates)
    out = {
        "engine": "moetier",
        "dtype": dtype,
        "load_s": load_s,
        "decode_tokens_per_s": tps,
        "decode_tokens_per_s_runs": rates,
        "bytes_per_token": bytes_per_token,
        "dense_bytes_per_token": dense_bytes,
        "routed_bytes_per_token": median(routed),
        "achieved_bytes_per_s": bytes_per_token * tps,
    }
    del m
    gc.collect()
    return out


def bench_transformers(path: Path, dtype: str, runs: int, tokens: int, prompt: list[int]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens, pad_token_id=0)

    class Clock:
        """generate() streamer: put() gets the prompt first, then each new token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    rates = []
    with torch.inference_mode():
        m.generate(ids, **kw)  # warm-up
        for _ in range(runs):
            clock = Clock()
            m.generate(ids, streamer=clock, **kw)
            new = clock.times[1:]  # first new token comes from the prefill
            rates.append((len(new) - 1) / (new[-1] - new[0]))
    del m
    gc.collect()
    return {"engine": "transformers-eager", "dtype": dtype, "load_s": load_s,
            "decode_tokens_per_s": median(rates), "decode_tokens_per_s_runs": rates}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure (comma list)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only", choices=["embedded", "synthetic"], default=None)
    ap.add_argument("--out", default="runtime_decode")
    args = ap.parse_args(argv)

    from moetier.runtime import EMBEDDED_DIR

    thread_counts = [int(t) for t in args.threads.split(",")]
    bws = {}
    for th in thread_counts:
        torch.set_num_threads(th)
        bws[th] = memory_bandwidth()
        print(f"memory read bandwidth ({th} threads): {bws[th] / 1e9:.1f} GB/s", file=sys.stderr)
    models: list[tuple[str, Path]] = []
    if args.only in (None, "embedded") and (EMBEDDED_DIR / "config.json").exists():
        models.append(("embedded", EMBEDDED_DIR))
    if args.only in (None, "synthetic"):
        models.append((f"synthetic-qwen3moe-{args.size_gb:g}GB", ensure_synthetic(args.size_gb)))
    prompt = list(range(10, 10 + args.prompt_len))
    results = []
    for name, path in models:
        for dtype in args.dtypes.split(","):
            for th in thread_counts:
                torch.set_num_threads(th)
                bw = bws[th]
                r = bench_moetier(path, dtype, args.runs, args.tokens, prompt)
                r.update(model=name, threads=th, memory_read_bytes_per_s=bw)
                r["fraction_of_memory_bw"] = r["achieved_bytes_per_s"] / bw
                r["roofline_tokens_per_s"] = bw / r["bytes_per_token"]
                print(json.dumps(r), file=sys.stderr)
                results.append(r)
                if not args.skip_hf:
                    h = bench_transformers(path, dtype, args.runs, args.tokens, prompt)
                    h.update(model=name, threads=th)
                    h["moetier_speedup"] = r["decode_tokens_per_s"] / h["decode_tokens_per_s"]
                    print(json.dumps(h), file=sys.stderr)
                    results.append(h)
    out = write_result(args.out, {
        "command": "python -m bench.bench_runtime " + " ".join(argv if argv is not None else sys.argv[1:]),
        "memory_read_bytes_per_s": {str(k): v for k, v in bws.items()},
        "load_average_1min": os.getloadavg()[0],
        "batch": 1,
        "prompt_tokens": args.prompt_len,
        "decode_tokens": args.tokens,
        "runs": args.runs,
        "results": results,
    })
    print(f"wrote {out}", file=sys.stderr)
    for r in results:
        extra = (f"  {r['fraction_of_memory_bw'] * 100:.0f}% of memory bw "
                 f"({r['bytes_per_token'] / 1e6:.0f} MB/token)" if r["engine"] == "moetier" else "")
        print(f"{r['model']:>28} {r['engine']:>18} {r['dtype']:>8} {r['threads']}t: "
              f"{r['decode_tokens_per_s']:7.2f} tok/s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
