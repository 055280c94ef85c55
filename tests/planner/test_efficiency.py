"""Per-chip / per-fabric efficiency (moetier.planner.efficiency) and how the step model uses it."""

from __future__ import annotations

import math

import pytest

from moetier.catalog import resolve_model
from moetier.planner import efficiency as eff
from moetier.planner.cluster import Layout, plan_cluster
from moetier.planner.machines import get_machine


def test_padded_rows_rounds_up_to_whole_tiles():
    assert eff.padded_rows(0, 64) == 0
    assert eff.padded_rows(1, 64) == 64
    assert eff.padded_rows(64, 64) == 64
    assert eff.padded_rows(65, 128) == 128
    assert eff.padded_rows(129, 128) == 256


def test_alpha_beta_collective():
    fab = eff.IB_NDR
    assert eff.collective_s(0, 50e9, fab) == 0
    small = eff.collective_s(1e3, 50e9, fab)
    big = eff.collective_s(1e9, 50e9, fab)
    assert small == pytest.approx(fab.alpha_s + 1e3 / (50e9 * fab.link_eff))
    assert small < 1.1 * fab.alpha_s  # small messages pay the latency floor
    assert big == pytest.approx(1e9 / (50e9 * fab.link_eff), rel=1e-3)  # large ones the bandwidth
    assert eff.collective_s(1e9, 50e9, fab, phases=2) - big == pytest.approx(fab.alpha_s)


def test_compute_key_uses_fp4_only_where_the_chip_has_it():
    assert eff.compute_key(get_machine("b200"), "nvfp4") == "fp4"
    assert eff.compute_key(get_machine("gb200"), "fp4") == "fp4"
    assert eff.compute_key(get_machine("h100"), "nvfp4") == "fp8"
    assert eff.compute_key(get_machine("h100"), "int4:g128") == "int8"
    assert eff.compute_key(get_machine("ascend-910c"), "int8") == "int8"
    assert eff.rate_key("mxfp4") == "fp4" and eff.rate_key("bf16") == "bf16"


def test_chip_and_fabric_lookup():
    assert eff.chip_eff(get_machine("h800")) is eff.HOPPER
    assert eff.chip_eff(get_machine("gb200")) is eff.BLACKWELL
    assert eff.chip_eff(get_machine("ascend-910c")) is eff.ASCEND
    other = eff.chip_eff(get_machine("mi300x"))  # no profile: the catalog efficiency
    assert other.family == "catalog" and other.gemm["default"] == get_machine("mi300x").efficiency.compute
    assert eff.fabrics(get_machine("gb200")).scale_up is eff.NVLINK5_72
    assert eff.fabrics(get_machine("b200")).scale_up is eff.NVLINK5
    assert eff.fabrics(get_machine("h800")).scale_out is eff.IB_NDR
    assert eff.fabrics(get_machine("ascend-910c")).scale_up is eff.UB
    assert eff.fabrics(get_machine("trainium3")).scale_up is eff.NEURONLINK
    for c in (eff.HOPPER, eff.BLACKWELL, eff.ASCEND):
        assert c.cite and all(0 < v <= 1 for v in c.gemm.values())


def test_mla_decode_attention_is_compute_bound_gqa_is_memory_bound():
    """Arithmetic intensity, not batch or context, decides: MLA's 128 heads share one latent cache
    (~240 FLOP per KV byte in BF16), GQA reads K and V per kv head (heads / kv_heads FLOP per byte)."""
    h = get_machine("h100")
    for batch, ctx in ((8, 1024), (128, 8192)):
        ds = plan_cluster(resolve_model("deepseek-v3"), h, Layout(devices=8, batch=batch, context=ctx),
                          precision="fp8")
        core = next(o for o in ds.ops if o.name == "attention core")
        assert core.compute_s > core.memory_s
        intensity = core.flops / core.bytes
        assert 200 < intensity < 260
        q = plan_cluster(resolve_model("qwen3-235b-a22b"), h, Layout(devices=8, batch=batch, context=ctx),
                         precision="fp8")
        qcore = next(o for o in q.ops if o.name == "attention core")
        assert qcore.memory_s > qcore.compute_s
    # attention time grows linearly with context once it binds
    a = plan_cluster(resolve_model("qwen3-235b-a22b"), h, Layout(devices=8, batch=64, context=4096), precision="fp8")
    b = plan_cluster(resolve_model("qwen3-235b-a22b"), h, Layout(devices=8, batch=64, context=8192), precision="fp8")
    ta = next(o for o in a.ops if o.name == "attention core").memory_s
    tb = next(o for o in b.ops if o.name == "attention core").memory_s
    assert tb == pytest.approx(2 * ta, rel=1e-6)


def test_fp8_kv_halves_attention_bytes():
    h = get_machine("gb200")
    ds = resolve_model("deepseek-v3")
    a = plan_cluster(ds, h, Layout(devices=48, batch=256, context=2048), precision="fp8")
    b = plan_cluster(ds, h, Layout(devices=48, batch=256, context=2048, kv_dtype="fp8", attention_dtype="fp8"),
                     precision="fp8")
    ca = next(o for o in a.ops if o.name == "attention core")
    cb = next(o for o in b.ops if o.name == "attention core")
    assert cb.bytes == pytest.approx(ca.bytes / 2)
    assert cb.compute_s == pytest.approx(ca.compute_s / 2)  # FP8 attention: twice the BF16 peak
    assert math.isclose(cb.flops, ca.flops)
