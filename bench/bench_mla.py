"""DeepSeek MLA speed: moetier's native path (single-token decode, multi-token prefill and batched
steps: native/mla.py, native/mla_prefill.py) vs its torch path, side by side in one run.

    python -m bench.bench_mla [--tokens 64,512] [--decode 16] [--batch 8] [--runs 3] [--threads 2]
                              [--layers 3] [--quantize int8|int4|fp8] [--name mla]   # -> bench/results/<name>.json

Model: a synthetic bf16 checkpoint shaped like DeepSeek-V2-Lite's layers (hidden 2048, 16 heads,
MLA kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128, YaRN; 64 routed experts top-6 of
intermediate 1408 plus 2 shared, layer 0 dense of intermediate 10944) with ``--layers`` layers
and a 32k vocabulary (V2-Lite's 102k head would dominate a 3-layer model's decode), random
weights (std 1/sqrt(fan_in)) written once to the bench cache. Everything in RAM. ``--quantize``
loads it with every linear weight quantized at load (``quantize_all``, kv_b_proj included: the
native decoder then reads its one plain copy, ``native/mla.py: plain_kv_b``).

One model; each run does the native path then the torch path (the decoder detached for the
call), alternating, so both see the same machine state; medians over runs, the ratio per run
pair. prefill tok/s = prompt tokens / wall time of the forward returning the last logits;
decode tok/s = greedy single-token steps after a 64-token prompt / their wall time; batch tok/s
= ``--batch`` sequences (64-token prompts) stepped one token each per forward. llama.cpp is
reported only when ``bench/peers.py``'s llama_cpp venv exists (it is never built here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import median, write_result
from bench.scenarios import bench_cache

SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
             num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2, first_k_dense_replace=1,
             intermediate_size=10944, vocab_size=32000, n_group=1, topk_group=1, topk_method="greedy",
             norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                              "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                              "mscale": 0.707, "mscale_all_dim": 0.707})


def config(layers: int) -> dict[str, Any]:
    return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": False, "num_hidden_layers": layers,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dtype": "bfloat16", **SHAPE}


def tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF DeepseekV2 tensor names -> shapes (per-expert layout)."""
    H, V, nh, C = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    E, I, SI = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_intermediate_size"] * cfg[
        "n_shared_experts"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                       "lm_head.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (nh * (dn + dr), H),
                    p + "self_attn.kv_a_proj_with_mqa.weight": (C + dr, H),
                    p + "self_attn.kv_a_layernorm.weight": (C,),
                    p + "self_attn.kv_b_proj.weight": (nh * (dn + dv), C),
                    p + "self_attn.o_proj.weight": (H, nh * dv)})
        if i < cfg["first_k_dense_replace"]:
            D = cfg["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (D, H), p + "mlp.up_proj.weight": (D, H),
                        p + "mlp.down_proj.weight": (H, D)})
            continue
        out[p + "mlp.gate.weight"] = (E, H)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H), q + "down_proj.weight": (H, I)})
        s = p + "mlp.shared_experts."
        out.update({s + "gate_proj.weight": (SI, H), s + "up_proj.weight": (SI, H), s + "down_proj.weight": (H, SI)})
    return out


def ensure_model(layers: int) -> Path:
    from safetensors.torch import save_file

    d = bench_cache() / f"synthetic-deepseek-v2-lite-L{layers}"
    if (d / "config.json").exists():
        return d
    print(f"writing synthetic checkpoint to {d} ...", file=sys.stderr, flush=True)
    d.mkdir(parents=True, exist_ok=True)
    cfg = config(layers)
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, n, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, n = {}, 0, n + 1

    for k, shape in tensors(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = 1.0 / shape[1] ** 0.5 * (4.0 if k.endswith("mlp.gate.weight") else 1.0)  # decisive router
            t = torch.randn(shape, generator=g) * std
        shard[k] = t.to(torch.bfloat16)
        size += shard[k].numel() * 2
        if size > 512 << 20:
            flush()
    if shard:
        flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(path: Path, tokens: list[int], decode: int, batch: int, runs: int, threads: int,
        quantize: str | None = None) -> list[dict[str, Any]]:
    import moetier

    q = {"quantize": quantize, "quantize_all": True} if quantize else {}
    m = moetier.load(path, tokenizer=False, threads=threads, **q)
    dec = m.net.native
    paths = m.compute_paths()
    assert dec is not None and all(p["path"] == "native" for p in paths.values()), paths
    V = m.spec.vocab_size

    def prompt(T: int) -> list[int]:
        return torch.randint(10, V, (T,), generator=torch.Generator().manual_seed(T)).tolist()

    cases: list[tuple[str, int, Any]] = []
    for T in tokens:
        def prefill(T: int = T) -> tuple[float, torch.Tensor]:
            seq, ids = m.new_sequence(capacity=T + 1), prompt(T)
            out: list[torch.Tensor] = []
            return T / timed(lambda: out.append(m.step([(seq, ids)]))), out[0]
        cases.append(("prefill", T, prefill))

    def decode_steps() -> tuple[float, torch.Tensor]:
        seq = m.new_sequence(capacity=64 + decode + 1)
        logits = m.step([(seq, prompt(64))])
        out = [logits]

        def steps() -> None:
            for _ in range(decode):
                out.append(m.step([(seq, [int(out[-1][-1].argmax())])]))
        return decode / timed(steps), torch.cat(out)
    cases.append(("decode", decode, decode_steps))

    def batch_steps() -> tuple[float, torch.Tensor]:
        seqs = [m.new_sequence(capacity=64 + decode + 1) for _ in range(batch)]
        first = m.step([(s, prompt(64 + j)[-64:]) for j, s in enumerate(seqs)])
        out = [first]

        def steps() -> None:
            for _ in range(decode):
                out.append(m.step([(s, [int(out[-1][j].argmax())]) for j, s in enumerate(seqs)]))
        return batch * decode / timed(steps), torch.cat(out)
    cases.append((f"batch{batch}", decode, batch_steps))

    results = []
    for kind, n, fn in cases:
        rates: dict[str, list[float]] = {"native": [], "torch": []}
        last: dict[str, torch.Tensor] = {}
        for r in range(runs + 1):  # run 0: warm-up (first-touch allocations), not reported
            for name in ("native", "torch"):
                m.net.native = dec if name == "native" else None
                rate, last[name] = fn()
                if r:
                    rates[name].append(rate)
        m.net.native = dec
        ratios = [a / b for a, b in zip(rates["native"], rates["torch"], strict=True)]
        rec = {"kind": kind, "tokens": n, "native_tok_s": median(rates["native"]),
               "torch_tok_s": median(rates["torch"]), "native_over_torch": median(ratios),
               "native_runs": rates["native"], "torch_runs": rates["torch"],
               # decode / batch: greedy paths may part once logits differ (bf16); the first row is comparable
               "first_row_max_abs_logit_diff": (last["native"][0] - last["torch"][0]).abs().max().item()}
        results.append(rec)
        print(f"  {kind} {n}: native {rec['native_tok_s']:.1f} tok/s, torch {rec['torch_tok_s']:.1f} tok/s, "
              f"native/torch {rec['native_over_torch']:.2f}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,512")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--quantize", default=None, choices=("int8", "int4", "fp8"),
                    help="every linear weight (kv_b_proj included) quantized at load")
    ap.add_argument("--name", default="mla", help="result file bench/results/<name>.json")
    a = ap.parse_args()
    path = ensure_model(a.layers)
    results = run(path, [int(t) for t in a.tokens.split(",")], a.decode, a.batch, a.runs, a.threads,
                  a.quantize)
    llama = (bench_cache() / "llama-venv" / "bin" / "python").exists()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    write_result(a.name, {
        "benchmark": "DeepSeek MLA (V2-Lite-shaped, bf16, in RAM): moetier native vs torch path, "
                     "prefill / decode / batched decode tok/s",
        "quantize_all": a.quantize,
        "command": "python -m bench.bench_mla " + " ".join(sys.argv[1:]),
        "model": {"layers": a.layers, **{k: v for k, v in SHAPE.items() if k != "rope_parameters"}},
        "threads": a.threads, "runs": a.runs, "loadavg_1m_after": float(load),
        "llama_cpp": "not run: no bench/peers.py llama_cpp venv" if not llama else
                     "not run: DeepSeek GGUF conversion is not wired into this bench",
        "results": results,
    })
    for r in results:
        print(f"{r['kind']:8s} {r['tokens']:4d}  native {r['native_tok_s']:8.1f}  torch {r['torch_tok_s']:8.1f}  "
              f"native/torch {r['native_over_torch']:.2f}")


if __name__ == "__main__":
    main()
