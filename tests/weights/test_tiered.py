"""The tiered provider end to end: moetier.load options, `moetier run --json`, metrics, plans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moetier
from moetier.errors import ConfigError
from moetier.models.base import ExpertProvider
from moetier.spec import load_spec
from moetier.weights import tiered
from moetier.weights.plan import default_plan
from tests.helpers import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiered"), "qwen3_moe", num_hidden_layers=3, num_experts=8)


def test_moetier_load_with_hierarchy_options(ckpt):
    ref = moetier.load(ckpt)
    m = moetier.load(ckpt, max_ram="2G", policy="lfu", expert_cache=0.25, prefetch=True)
    try:
        assert isinstance(m.hierarchy, ExpertProvider)
        assert m.hierarchy.cache.capacity == int(0.25 * 24)  # a quarter of the routed experts
        ids = list(range(4, 30))
        assert torch.equal(m.logits(ids), ref.logits(ids))
        s = m.hierarchy_metrics.summary()
        assert s["tokens"] == len(ids) and s["steps"] == 1
        assert set(s["bytes_per_token"]) == {"resident", "cache", "store"}
        assert 0 <= s["hit_rate"] <= 1 and s["stall_seconds"] >= 0
        assert m.placement_plan.policy == "lfu" and m.memory_budget.max_ram == 2_000_000_000
    finally:
        m.hierarchy.close()
    with pytest.raises(ConfigError, match="not both"):
        moetier.load(ckpt, max_ram="2G", expert_provider_factory=lambda s, r: None)


def test_default_plan_options_override_plan_file(ckpt, tmp_path):
    spec = load_spec(ckpt)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"policy": "lru", "expert_cache": "1M", "prefetch": False, "cache_scope": "per_layer"}))
    from moetier.weights.plan import load_plan

    base = load_plan(f, spec)
    p = default_plan(spec, None, "3G", base=base, policy="adaptive", prefetch=True)
    assert (p.policy, p.prefetch, p.cache_bytes, p.cache_scope, p.max_ram) == ("adaptive", True, 10**6, "per_layer",
                                                                               3 * 10**9)
    p = default_plan(spec, None, None, expert_cache="0.5")
    assert p.cache_fraction == 0.5 and p.cache_bytes is None
    with pytest.raises(ConfigError, match="--policy"):
        default_plan(spec, None, None, policy="belady")
    m = tiered.load(ckpt, plan=f)
    try:
        assert m.hierarchy.cache.scope == "per_layer" and not m.placement_plan.prefetch
    finally:
        m.hierarchy.close()


def test_static_policy_reads_routing_profile_json(ckpt, tmp_path):
    import shutil

    d = tmp_path / "with_profile"
    shutil.copytree(ckpt, d)
    counts = [[0, 0, 0, 9, 8, 0, 0, 0]] * 3
    (d / "routing_profile.json").write_text(json.dumps({
        "format": "moetier.routing_profile/1",
        "layers": [{"layer": i, "counts": counts[i]} for i in range(3)],
    }))
    m = tiered.load(d, policy="static", cache_slots=6, cache_scope="per_layer")
    try:
        assert sorted(m.hierarchy.cache.valid) == [(layer, e) for layer in range(3) for e in (3, 4)]
    finally:
        m.hierarchy.close()
    with pytest.raises(Exception, match="profile"):
        tiered.load(ckpt, policy="static", cache_slots=4)


def test_run_command_json_reports_hierarchy(ckpt):
    cmd = [sys.executable, "-m", "moetier.cli", "run", str(ckpt), "--prompt", "hello world", "--max-tokens", "6",
           "--max-ram", "2G", "--policy", "adaptive", "--expert-cache", "0.5", "--no-prefetch", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for k in ("hit_rate", "bytes_per_token", "stall_seconds", "predicted_decode_tokens_per_s", "prefetch_precision"):
        assert k in out
    assert out["hierarchy"]["policy"]["name"] == "adaptive" and out["prefetch_precision"] is None
    assert set(out["bytes_per_token"]) == {"resident", "cache", "store"}
    if out["predicted_decode_tokens_per_s"] is not None:
        assert out["measured_over_predicted"] > 0
    p = subprocess.run(cmd[:-1] + ["--max-ram", "5M"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "the smallest that works is --max-ram" in p.stderr


def test_decode_hit_rate_counts_decode_steps_only(ckpt):
    m = tiered.load(ckpt, policy="lru", cache_slots=4, prefetch=False)
    try:
        metrics = m.hierarchy_metrics
        m.logits(list(range(4, 30)))  # prefill only: no decode accesses
        assert metrics.decode_hit_rate is None and metrics.hit_rate is not None
        res = m.generate_ids(list(range(4, 20)), max_tokens=9)
        steps = res.decode_steps  # single-token forwards after the prefill
        k, layers = m.spec.top_k, len(m.spec.moe_layer_ids)
        counted = sum(c.decode_accesses for c in metrics.layers.values())
        assert counted == steps * layers * k  # one token: k distinct experts per MoE layer
        served = sum(c.decode_served for c in metrics.layers.values())
        assert metrics.decode_hit_rate == served / counted
        assert 0.0 <= metrics.decode_hit_rate <= 1.0
        assert metrics.summary()["decode_hit_rate"] == metrics.decode_hit_rate
    finally:
        m.hierarchy.close()
