"""Native Llama-4 decode (NoPE layers with the query temperature, chunked RoPE layers with
L2 q/k norm, sigmoid router on the expert input, shared expert, dense layers) against the
torch path: float32 <= 1e-4 max |dlogit| over a 40-token prefill (torch) and 16 native greedy
steps across chunk boundaries, same tokens. And: every family moetier supports decodes natively."""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers the deepseek / gpt_oss / llama4 recipes)
from tests.helpers.checkpoints import FAMILIES, make_tiny_checkpoint
from tests.native.common import greedy_steps

PROMPT = [(3 * i + 4) % 250 + 2 for i in range(40)]
STEPS = 16

CONFIGS = {
    "chunk8_nope2": {},  # layers alternate RoPE + chunk 8 + L2 norm / NoPE + temperature; all MoE, top-1
    "dense_top2_noqknorm": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False,
                                attention_chunk_size=5, no_rope_layer_interval=3),
}


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py


def greedy(model, prompt, steps):
    return greedy_steps(model, prompt, steps, first=9)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_llama4_matches_torch(lib, tmp_path, name):
    from moetier.native.llama4 import Llama4Decoder

    ck = make_tiny_checkpoint(tmp_path, "llama4", tokenizer=False, **CONFIGS[name])
    m = moetier.load(ck, tokenizer=False, dtype="float32")
    t = moetier.load(ck, tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None and isinstance(m.net.native, Llama4Decoder)
    descs = m.net.native.descs
    assert {d.rope for d in descs} == {0, 2} and any(d.chunk for d in descs) and any(d.attn_scale for d in descs)
    assert all(d.SI for d in descs)  # shared expert (or the dense MLP) on every layer
    if name == "dense_top2_noqknorm":
        assert any(d.E == 0 for d in descs) and not any(d.qk_l2 for d in descs)
    else:
        assert all(d.qk_l2 for d in descs if d.rope) and all(d.topk == 1 for d in descs)
    got, gt = greedy(m, PROMPT, STEPS)
    want, wt = greedy(t, PROMPT, STEPS)
    assert gt == wt
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_and_provider_independent(lib, tmp_path, dtype):
    ck = make_tiny_checkpoint(tmp_path, "llama4", tokenizer=False)
    m = moetier.load(ck, tokenizer=False, dtype=dtype)
    h = moetier.load(ck, tokenizer=False, dtype=dtype, expert_cache=0.5)
    assert h.native_reason is None
    before = torch.get_num_threads()
    try:
        runs = {}
        for nth in (1, 3):
            torch.set_num_threads(nth)
            runs[nth] = greedy(m, [], 12)[0]
        tiered = greedy(h, [], 12)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[1], runs[3]) and torch.equal(runs[1], tiered)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_natively(lib, tmp_path, family):
    ck = make_tiny_checkpoint(tmp_path, family, tokenizer=False)
    m = moetier.load(ck, tokenizer=False, dtype="float32")
    assert m.native_reason is None, f"{family}: {m.native_reason}"
    assert m.compute_paths()["decode"]["path"] == "native"


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "gpt_oss", "llama4"])
def test_prefetching_hierarchy_same_bits(lib, tmp_path, family):
    """With the weight hierarchy's router prefetch (a pre-hook on each post-attention norm, called
    by the native steps) the new families' native steps give the in-RAM bits."""
    ck = make_tiny_checkpoint(tmp_path, family, tokenizer=False, num_hidden_layers=3)  # >= 2 MoE layers
    ram = moetier.load(ck, tokenizer=False, dtype="float32")
    tiered = moetier.load(ck, tokenizer=False, dtype="float32", expert_cache=0.5, prefetch=True)
    try:
        assert tiered.native_reason is None
        assert any(layer.post_attention_layernorm._forward_pre_hooks for layer in tiered.net.layers)
        want, wt = greedy(ram, PROMPT[:16], 10)
        got, gt = greedy(tiered, PROMPT[:16], 10)
        assert gt == wt and torch.equal(got, want)
    finally:
        tiered.hierarchy.close()
