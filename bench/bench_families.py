"""Native vs torch decode, per family, on small random checkpoints (side by side, one process).

    python -m bench.bench_families [--threads 1] [--rounds 2] [--tokens 48]

Each family's checkpoint is written once by the test helpers (``tests.helpers.checkpoints``,
transformers' ``save_pretrained``; DeepSeek-V2 scaled to a V2-Lite-like shape: MLA with
kv_lora_rank 128, 32 routed + 2 shared experts, top-6), in bf16. Per round, for native on and
off: load, one warm-up generation, then a 64-token prompt and ``--tokens`` greedy steps; the
decode tok/s medians over rounds are compared. Results: ``bench/results/families.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import median, write_result

SHAPES = {
    "deepseek_v2": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=2,
                        intermediate_size=1024, vocab_size=4096),
    "deepseek_v3": {},
    "gpt_oss": {},
    "llama4": {},
}


def main(argv: list[str] | None = None) -> int:
    import moetier
    import tests.helpers.moe_families  # noqa: F401
    from tests.helpers.checkpoints import make_tiny_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fam, shape in SHAPES.items():
            ck = make_tiny_checkpoint(Path(tmp) / fam, fam, tokenizer=False, dtype=torch.bfloat16, **shape)
            rates: dict[str, list[float]] = {"native": [], "torch": []}
            for _ in range(args.rounds):
                for native in (True, False):
                    m = moetier.load(ck, tokenizer=False, dtype="bfloat16", native=native, threads=args.threads)
                    prompt = [(7 * i + 5) % m.spec.vocab_size for i in range(64)]
                    m.generate_ids(prompt, 8, stop_ids=[])
                    g = m.generate_ids(prompt, args.tokens, stop_ids=[])
                    rates["native" if native else "torch"].append(g.decode_tokens_per_s)
            n, t = median(rates["native"]), median(rates["torch"])
            out[fam] = {"native_decode_tok_s": n, "torch_decode_tok_s": t, "speedup": n / t, "rounds": rates}
            print(f"[families] {fam}: native {n:.1f} tok/s, torch {t:.1f} tok/s -> {n / t:.1f}x", flush=True)
    path = write_result("families", {"command": "python -m bench.bench_families " + " ".join(argv or sys.argv[1:]),
                                     "settings": vars(args), "families": out})
    print(f"[families] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
