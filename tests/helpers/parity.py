"""Parity check against transformers (the oracle): prefill logits and greedy decode steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import moetier


def hf_load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def assert_parity(path: Path, prompt_len: int = 33, steps: int = 16, atol: float = 1e-4, seed: int = 0,
                  ref_path: Path | None = None, ours: Any = None) -> float:
    """max |logit diff| <= atol on a prefill and on each greedy decode step; same tokens.

    ``ref_path``: the checkpoint transformers loads (default ``path``; e.g. the dequantized
    twin of a quantized checkpoint). ``ours``: an already loaded moetier model of ``path``.
    Returns the largest difference seen (for reporting).
    """
    ours = ours or moetier.load(path, dtype="float32", tokenizer=False)
    ref = hf_load(ref_path or path)
    vocab = ours.spec.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed))

    # full prefill (all positions)
    got = ours.logits(prompt)
    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
    want = out.logits[0].float()
    worst = (got - want).abs().max().item()
    assert got.shape == want.shape == (prompt_len, vocab)
    assert worst <= atol, f"prefill max |diff| {worst:.3g} > {atol}"

    # greedy decode, step by step, both with KV caches
    seq = ours.new_sequence()
    ours_logits = ours.step([(seq, prompt)])[0]
    past = out.past_key_values
    ref_logits = want[-1]
    for i in range(steps):
        d = (ours_logits - ref_logits).abs().max().item()
        worst = max(worst, d)
        assert d <= atol, f"decode step {i}: max |diff| {d:.3g} > {atol}"
        tok_ours, tok_ref = int(ours_logits.argmax()), int(ref_logits.argmax())
        assert tok_ours == tok_ref, f"decode step {i}: greedy token {tok_ours} != transformers {tok_ref}"
        ours_logits = ours.step([(seq, [tok_ours])])[0]
        with torch.no_grad():
            out = ref(torch.tensor([[tok_ref]]), past_key_values=past, use_cache=True)
        past, ref_logits = out.past_key_values, out.logits[0, -1].float()
    return worst
