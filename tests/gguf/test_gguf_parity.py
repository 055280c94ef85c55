"""GGUF files converted by llama.cpp's convert_hf_to_gguf.py run like their HF originals."""

from __future__ import annotations

import pytest
import torch

import moetier
from tests.gguf.helpers import fixture, hf_original

pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

BF16 = ["qwen3moe-bf16", "qwen2moe-bf16", "mixtral-bf16", "olmoe-bf16", "deepseek2-bf16", "gptoss-bf16"]


@pytest.mark.parametrize("name", BF16)
def test_bf16_gguf_matches_transformers(name: str) -> None:
    ours = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    ref = hf_original(name)
    prompt = torch.randint(3, ours.spec.vocab_size, (19,), generator=torch.Generator().manual_seed(0))
    got = ours.logits(prompt)
    with torch.no_grad():
        want = ref(prompt[None]).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
    # greedy decode steps through the KV cache
    seq = ours.new_sequence(capacity=64)
    ours.step([(seq, prompt)])
    ids = prompt.tolist()
    for _ in range(6):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0, -1]
        tok = int(want.argmax())
        ids.append(tok)
        got = ours.step([(seq, [tok])])[0]
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0, -1]
        assert (got - want).abs().max().item() <= 1e-4
