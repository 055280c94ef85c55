"""Huge-page weight arena: same values, weights really inside the mapping, views kept."""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek/gpt_oss/llama4 recipes)
from moetier.weights import arena as arena_mod
from moetier.weights import tiered
from tests.helpers import make_tiny_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128]

pytestmark = pytest.mark.skipif(arena_mod.thp_mode() not in ("always", "madvise"),
                                reason="transparent huge pages are off on this machine")


def inside(t: torch.Tensor, a: arena_mod.Arena) -> bool:
    return a.addr <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= a.addr + a.used


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("native", [True, False])
def test_same_logits_and_tokens(tmp_path, family, native):
    path = make_tiny_checkpoint(tmp_path, family)
    plain = moetier.load(path, tokenizer=False, hugepages=False, native=native)
    packed = moetier.load(path, tokenizer=False, native=native)
    assert plain.arena is None and packed.arena is not None and packed.arena.advised
    assert torch.equal(packed.logits(PROMPT), plain.logits(PROMPT))
    assert packed.generate_ids(PROMPT, 8).ids == plain.generate_ids(PROMPT, 8).ids
    a = packed.arena
    for name, p in packed.net.named_parameters():
        assert inside(p, a), name
    for w in packed.provider.experts.values():
        assert inside(w.gate_up, a) and inside(w.down, a)


def test_fused_qkv_views_stay_views(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe")
    m = moetier.load(path, tokenizer=False)
    attn = m.net.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert inside(attn.qkv_weight, m.arena)
    assert q.data_ptr() == attn.qkv_weight.data_ptr()
    assert v.data_ptr() + v.numel() * v.element_size() == attn.qkv_weight.data_ptr() + attn.qkv_weight.nbytes
    assert k.data_ptr() == q.data_ptr() + q.nbytes


def test_tiered_packs_only_the_always_on_set(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe")
    m = tiered.load(path, tokenizer=False, cache_slots=2, policy="lru")
    try:
        assert m.arena is not None
        expert_bytes = m.spec.num_experts * len(m.spec.moe_layer_ids) * m.expert_reader.expert_nbytes()
        assert m.arena.used < expert_bytes  # experts stay in the provider's slots
        for name, p in m.net.named_parameters():
            assert inside(p, m.arena), name
    finally:
        m.hierarchy.close()


def test_full_arena_refuses():
    a = arena_mod.Arena(128)
    a.take(torch.zeros(16))
    with pytest.raises(MemoryError, match="full"):
        a.take(torch.zeros(64))
