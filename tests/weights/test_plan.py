"""PlacementPlan: declarative files, selectors, validation errors, tensor classification."""

from __future__ import annotations

import json

import pytest

from moetier.errors import ConfigError
from moetier.spec import spec_from_config
from moetier.weights.plan import PlacementPlan, classify_tensor, load_plan, parse_bytes, plan_from_mapping

CFG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 16,
    "num_experts_per_tok": 2,
}
SPEC = spec_from_config(CFG)


def test_parse_bytes_units():
    assert parse_bytes("3G") == 3_000_000_000
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(2**20) == 2**20 and parse_bytes("1024B") == 1024
    assert parse_bytes("1.5GB") == 1_500_000_000
    for bad in ("-1G", "3X", "", True, 0, 1024, "600"):  # a bare number below 1 MiB is not meant as bytes
        with pytest.raises(ConfigError, match="size"):
            parse_bytes(bad, "size")


def test_rules_later_override_earlier_and_always_on_is_resident():
    plan = plan_from_mapping(
        {
            "expert_cache": 0.25,
            "rules": [
                {"kind": "routed_experts", "layers": "0-7", "tier": "store"},
                {"kind": "routed_experts", "layers": "6-7", "experts": "0-3,9", "tier": "resident"},
            ],
        },
        SPEC,
    )
    assert plan.cache_fraction == 0.25 and plan.cache_bytes is None
    assert plan.tier_of("routed_experts", 0, 0) == "store"
    assert plan.tier_of("routed_experts", 6, 3) == "resident"
    assert plan.tier_of("routed_experts", 6, 9) == "resident"
    assert plan.tier_of("routed_experts", 6, 4) == "store"
    assert plan.tier_of("attention", 3) == "resident"
    tiers = plan.expert_tiers(SPEC)
    assert len(tiers) == 8 * 16
    assert sum(t == "resident" for t in tiers.values()) == 2 * 5
    assert plan.resolved_cache_bytes(1000.0) == 250


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"rules": [{"kind": "attention", "tier": "store"}]}, "always-on"),
        ({"rules": [{"kind": "routed_experts", "layers": "0-8", "tier": "cache"}]}, "outside 0-7"),
        ({"rules": [{"kind": "routed_experts", "experts": "16", "tier": "cache"}]}, "outside 0-15"),
        ({"rules": [{"kind": "routed_experts", "tier": "gpu"}]}, "'tier'"),
        ({"rules": [{"kind": "experts", "tier": "cache"}]}, "'kind'"),
        ({"rules": [{"kind": "routed_experts", "tier": "cache", "regex": ".*"}]}, "unknown key"),
        ({"cache_scope": "both"}, "cache_scope"),
        ({"max_ram": "lots"}, "max_ram"),
        ({"expert_cache": -3}, "expert_cache"),
        ({"polcy": "lru"}, "unknown field"),
        ({"prefetch": {"enabled": True, "depth": 3}}, "prefetch"),
    ],
)
def test_bad_plans_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_from_mapping(data, SPEC, source="p.yaml")


def test_load_plan_yaml_and_json(tmp_path):
    y = tmp_path / "plan.yaml"
    y.write_text("max_ram: 3G\nexpert_cache: 1G\npolicy: {name: lfu}\nprefetch: true\n"
                 "rules:\n  - {kind: routed_experts, layers: 0-3, tier: cache}\n")
    plan = load_plan(y, SPEC)
    assert plan.max_ram == 3_000_000_000 and plan.cache_bytes == 1_000_000_000
    assert plan.policy == "lfu" and plan.prefetch
    j = tmp_path / "plan.json"
    j.write_text(json.dumps(plan.to_json() | {"source": None} and {"max_ram": "2G"}))
    assert load_plan(j, SPEC).max_ram == 2_000_000_000
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_plan(bad, SPEC)
    with pytest.raises(ConfigError, match="not found"):
        load_plan(tmp_path / "missing.yaml", SPEC)


def test_default_plan_object_is_immutable():
    plan = PlacementPlan()
    with pytest.raises(AttributeError):
        plan.policy = "lfu"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.embed_tokens.weight", ("embedding", None, None)),
        ("lm_head.weight", ("lm_head", None, None)),
        ("model.norm.weight", ("norms", None, None)),
        ("model.layers.3.self_attn.q_proj.weight", ("attention", 3, None)),
        ("model.layers.3.self_attn.q_norm.weight", ("norms", 3, None)),
        ("model.layers.3.input_layernorm.weight", ("norms", 3, None)),
        ("model.layers.3.mlp.gate.weight", ("router", 3, None)),
        ("model.layers.3.mlp.gate.e_score_correction_bias", ("router", 3, None)),
        ("model.layers.3.mlp.experts.11.down_proj.weight", ("routed_experts", 3, 11)),
        ("model.layers.3.block_sparse_moe.experts.2.w1.weight", ("routed_experts", 3, 2)),
        ("model.layers.3.block_sparse_moe.gate.weight", ("router", 3, None)),
        ("model.layers.3.mlp.experts.gate_up_proj", ("routed_experts", 3, None)),
        ("model.layers.3.mlp.router.bias", ("router", 3, None)),
        ("model.layers.3.mlp.shared_expert.up_proj.weight", ("shared_experts", 3, None)),
        ("model.layers.3.mlp.shared_expert_gate.weight", ("shared_experts", 3, None)),
        ("model.layers.3.mlp.shared_experts.up_proj.weight", ("shared_experts", 3, None)),
        ("model.layers.1.mlp.gate_proj.weight", ("dense_ffn", 1, None)),
        ("model.layers.8.mlp.experts.0.up_proj.weight", ("mtp", 8, None)),
    ],
)
def test_classify_tensor(name, expected):
    assert classify_tensor(name, SPEC) == expected
