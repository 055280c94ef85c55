"""Tiered runs are bit-identical (torch.equal) to the all-in-RAM run.

Every policy, cache size (including 0 = every expert read from the store, and sizes that
force evictions inside one step), cache scope, prefetch on/off, pinned / store-tier rules,
several families (per-expert and fused on-disk layouts), float32 and bfloat16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek/gpt_oss/llama4 recipes)
from moetier.weights import tiered
from moetier.weights.plan import plan_from_mapping
from tests.helpers import make_tiny_checkpoint
from tests.helpers.checkpoints import fuse_experts

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128, 33, 8, 200, 150, 77, 21, 9, 180, 44, 2 + 100]
N_NEW = 10


def reference(path, dtype="auto"):
    m = moetier.load(path, dtype=dtype)
    return m.logits(PROMPT), m.generate_ids(PROMPT, N_NEW).ids


def check(path, ref, **opts):
    logits0, ids0 = ref
    m = tiered.load(path, **opts)
    try:
        assert torch.equal(m.logits(PROMPT), logits0), opts
        assert m.generate_ids(PROMPT, N_NEW).ids == ids0, opts
        return m.hierarchy_metrics
    finally:
        m.hierarchy.close()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("q3"), "qwen3_moe", num_hidden_layers=3, num_experts=8)
    return path, reference(path)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfu-decay", "adaptive", "static"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_policies_prefetch_bit_identical(qwen3, policy, prefetch):
    path, ref = qwen3
    profile = np.arange(3 * 8, dtype=float).reshape(3, 8) if policy == "static" else None
    for slots in (0, 2, 5, 24):
        m = check(path, ref, policy=policy, prefetch=prefetch, cache_slots=slots, profile=profile)
        assert m.accesses > 0
        if slots == 24 and policy != "static":
            assert m.cache_hit_rate > 0.5
        if slots == 0:
            assert m.cache_hit_rate == 0.0
    if prefetch:
        assert m.prefetch_precision is not None and m.prefetch_recall is not None


def test_per_layer_scope_pinned_and_store_rules(qwen3):
    path, ref = qwen3
    spec = moetier.load(path).spec
    plan = plan_from_mapping({
        "cache_scope": "per_layer",
        "policy": "lru",
        "prefetch": {"enabled": True, "max_inflight_bytes": "1B"},  # with its unit: tiny is meant
        "rules": [
            {"kind": "routed_experts", "layers": "0", "experts": "0-3", "tier": "resident"},
            {"kind": "routed_experts", "layers": "2", "tier": "store"},
        ],
    }, spec)
    m = check(path, ref, plan=plan, cache_slots=6)
    per_layer = m.summary()["hit_rate_per_layer"]
    assert per_layer["2"] == 0.0  # store tier: never cached
    assert m.layers[0].resident > 0


def test_budget_sized_cache_bit_identical(qwen3):
    path, ref = qwen3
    m = check(path, ref, max_ram="3G", policy="adaptive", prefetch=True)
    assert m.accesses > 0


def test_bfloat16_and_direct_io(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2, dtype=torch.bfloat16)
    ref = reference(path)
    check(path, ref, policy="lru", cache_slots=3, prefetch=True, io="direct")
    # float32 checkpoint run in bfloat16: conversion in the store equals the loader's
    path32 = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2, name="f32")
    check(path32, reference(path32, "bfloat16"), dtype="bfloat16", policy="lfu", cache_slots=2)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "gpt_oss", "llama4"])
def test_families_bit_identical(tmp_path, family):
    path = make_tiny_checkpoint(tmp_path, family)
    ref = reference(path)
    for prefetch in (False, True):
        check(path, ref, policy="lru", cache_slots=2, prefetch=prefetch)


def test_fused_expert_layout_bit_identical(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2)
    fuse_experts(path)
    ref = reference(path)
    check(path, ref, policy="adaptive", cache_slots=3, prefetch=True)
    check(path, ref, policy="lru", cache_slots=0, prefetch=False, io="direct")
