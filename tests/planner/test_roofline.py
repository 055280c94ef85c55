"""Single-machine planner: placement, the triangle, invariants, what-if, bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from moetier.catalog import resolve_model
from moetier.cli import main
from moetier.errors import MoetierError
from moetier.planner import roofline as rl
from moetier.planner.census import census
from moetier.planner.hardware import Efficiency, Link, Machine, MemoryTier
from moetier.spec import spec_from_config

CFG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=1000, hidden_size=256,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
           intermediate_size=512, num_experts=16, moe_intermediate_size=128, num_experts_per_tok=2)
SPEC = spec_from_config(CFG, name="tiny")
CEN = census(SPEC, "bf16")
AO, EB, KV1 = CEN.always_on_bytes, CEN.expert_bytes, rl.kv_cache_bytes(SPEC, 16)


def mk(hbm_cap=1e9, hbm_bw=1e9, dram_bw=1e8, link_bw=1e7, flops=1e12, host_flops=None, eff=1.0) -> Machine:
    return Machine(
        name="test",
        tiers=(MemoryTier("hbm", hbm_cap, hbm_bw), MemoryTier("dram", 1e10, dram_bw, compute_flops=host_flops)),
        flops={"bf16": flops},
        links=(Link("pcie", "dram", "hbm", link_bw),),
        efficiency=Efficiency(eff, eff, eff),
        compute_tier="hbm",
    )


def test_tiny_spec_sizes():
    assert CEN.expert_bytes == 3 * 256 * 128 * 2
    assert SPEC.num_moe_layers == 4 and SPEC.num_experts == 16


def test_decode_time_by_hand():
    """All weights in hbm, batch 1: memory bytes and FLOPs computed independently here."""
    m = mk(hbm_bw=1e9, flops=1e12)
    r = rl.plan(SPEC, m, batch=1, context=16)
    emb = CEN.groups["embedding"]
    always_read = AO - emb.bytes + 256 * 2  # embedding: one looked-up row
    experts = 4 * 2 * EB  # 4 MoE layers x top_k unique experts at batch 1
    kv = 16 * 4 * (2 * 2 * 64 * 2)  # context x layers x (K+V x kv_heads x head_dim x 2 bytes)
    assert r.kv_bytes == kv
    assert r.decode.memory_s == pytest.approx((always_read + experts + kv) / 1e9)
    flops = 2 * CEN.active_params_excluding_embedding + 4 * 4 * 64 * 16 * 4
    assert r.decode.flops == pytest.approx(flops)
    assert r.decode.compute_s == pytest.approx(flops / 1e12)
    assert r.decode.communication_s == 0
    assert r.bottleneck == "memory"
    assert r.decode_tokens_per_s == pytest.approx(1 / r.decode.memory_s)
    assert r.hit_rate == 1.0
    # efficiency divides the rates
    r2 = rl.plan(SPEC, replace(m, efficiency=Efficiency(0.5, 0.5, 0.5)), batch=1, context=16)
    assert r2.decode.memory_s == pytest.approx(2 * r.decode.memory_s)
    assert r2.efficiency == {"compute": 0.5, "memory": 0.5, "link": 0.5}


def test_no_overlap_adds():
    m = mk(hbm_cap=AO + KV1 + 20 * EB)
    a = rl.plan(SPEC, m, context=16)
    b = rl.plan(SPEC, m, context=16, overlap=False)
    assert b.decode.step_time_s == pytest.approx(a.decode.compute_s + a.decode.memory_s + a.decode.communication_s)
    assert b.decode_tokens_per_s < a.decode_tokens_per_s


def test_placement_puts_always_on_first():
    m = mk(hbm_cap=AO + KV1 + 10.5 * EB)
    r = rl.plan(SPEC, m, context=16)
    hbm, dram = r.placement
    assert set(hbm.groups) >= {"attention", "embedding", "norms", "router"}
    assert hbm.kv_bytes == KV1 and dram.kv_bytes == 0
    assert hbm.experts == 10 and dram.experts == 64 - 10
    assert r.decode.communication_s > 0
    assert 0 < r.hit_rate < 1
    # too small for the always-on set: it goes whole to the next tier that holds it
    r2 = rl.plan(SPEC, mk(hbm_cap=AO / 2), context=16)
    assert {"attention", "embedding"} <= set(r2.placement[1].groups)
    assert "lm_head" in r2.placement[0].groups  # whole groups that fit still move nearer
    assert any("always-on" in a for a in r2.assumptions)


def test_profile_puts_hot_experts_near():
    prof = np.ones((4, 16))
    prof[:, 3] = 50.0  # expert 3 is hot in every layer
    r = rl.plan(SPEC, mk(hbm_cap=AO + KV1 + 4.5 * EB), context=16, profile=prof)
    assert (r.expert_tier[:, 3] == 0).all()
    assert (r.expert_tier == 0).sum() == 4
    u = rl.plan(SPEC, mk(hbm_cap=AO + KV1 + 4.5 * EB), context=16)
    assert r.hit_rate > u.hit_rate
    assert r.decode_tokens_per_s > u.decode_tokens_per_s


def test_cache_and_fast_mem_caps():
    r = rl.plan(SPEC, mk(), context=16, cache_bytes=0)
    assert r.placement[0].experts == 0 and r.hit_rate == 0
    r = rl.plan(SPEC, mk(), context=16, cache_bytes=5 * EB)
    assert r.placement[0].experts == 5
    r = rl.plan(SPEC, mk(), context=16, fast_mem=AO + KV1 + 3 * EB)
    assert r.placement[0].experts == 3 and r.placement[0].capacity_bytes == AO + KV1 + 3 * EB


SCENARIOS = [dict(batch=1, fast=3), dict(batch=8, fast=20), dict(batch=64, fast=0), dict(batch=1, fast=64),
             dict(batch=1, fast=3, host=1e10), dict(batch=256, fast=10, host=1e9)]


def _scenario(s, **kw):
    base = dict(hbm_cap=AO + KV1 * s["batch"] + s["fast"] * EB + 1, host_flops=s.get("host"))
    base.update(kw)
    return rl.plan(SPEC, mk(**base), batch=s["batch"], context=16)


@pytest.mark.parametrize("s, knob", [(s, k) for s in SCENARIOS
                                     for k in ("hbm_bw", "dram_bw", "link_bw", "flops", "host_flops")
                                     if k != "host_flops" or s.get("host")])
def test_more_of_a_resource_never_slows(s, knob):
    defaults = dict(hbm_bw=1e9, dram_bw=1e8, link_bw=1e7, flops=1e12, host_flops=s.get("host") or 1e9)
    before = _scenario(s)
    after = _scenario(s, **{knob: defaults[knob] * 4})
    assert after.decode_tokens_per_s >= before.decode_tokens_per_s * (1 - 1e-12)
    assert after.prefill_tokens_per_s >= before.prefill_tokens_per_s * (1 - 1e-12)


@pytest.mark.parametrize("batch", [1, 16])
def test_more_fast_capacity_never_slows_without_in_place_compute(batch):
    tps = [rl.plan(SPEC, mk(hbm_cap=AO + KV1 * batch + n * EB + 1), batch=batch, context=16).decode_tokens_per_s
           for n in (0, 8, 32, 64)]
    assert tps == sorted(tps)


def test_bottleneck_follows_the_arithmetic():
    # experts mostly far, thin link: communication binds
    r = rl.plan(SPEC, mk(hbm_cap=AO + KV1 + 2 * EB, link_bw=1e6), context=16)
    assert r.bottleneck == "communication"
    # everything near, slow hbm: memory binds
    r = rl.plan(SPEC, mk(hbm_bw=1e6), context=16)
    assert r.bottleneck == "memory"
    # huge batch, fast memory, weak compute: compute binds, and its share grows with batch
    shares = []
    for b in (1, 64, 4096):
        r = rl.plan(SPEC, mk(hbm_bw=1e10, flops=1e12, hbm_cap=1e12), batch=b, context=16)
        shares.append(r.decode.compute_s / r.decode.step_time_s)
    assert shares == sorted(shares) and shares[0] < 1
    assert r.bottleneck == "compute"


def test_in_place_compute_beats_moving_at_small_batch():
    """Fiddler: with a strong host, a missed expert is computed where it lives at batch 1."""
    far = dict(hbm_cap=AO + KV1 + 2 * EB, link_bw=1e7, dram_bw=1e10)
    moved = rl.plan(SPEC, mk(**far), context=16)
    inplace = rl.plan(SPEC, mk(**far, host_flops=1e12), context=16)
    dram = inplace.decode.tiers[1]
    assert dram.mode == "split" and moved.decode.tiers[1].mode == "move"
    assert moved.decode.tiers[1].moved_fraction == 1.0
    assert dram.moved_fraction < 0.1  # the host does most of the misses at batch 1
    assert inplace.decode_tokens_per_s > moved.decode_tokens_per_s
    # the split is never slower than either path alone
    t_move = moved.decode.communication_s
    assert dram.time_s < t_move
    # the more tokens share an expert, the more of the misses are moved instead (compute grows
    # with tokens, the bytes to move do not)
    fr = [rl.plan(SPEC, mk(**{**far, "hbm_cap": 1e9}, host_flops=3e8), batch=b, context=16,
                  cache_bytes=2 * EB).decode.tiers[1].moved_fraction for b in (1, 32, 512)]
    assert fr == sorted(fr) and fr[0] < 0.5 < fr[-1]


def test_kv_cache_mla_and_gqa():
    ds = resolve_model("deepseek-v3")
    assert rl.kv_bytes_per_token_layer(ds) == (512 + 64) * 2
    assert rl.kv_cache_bytes(ds, 1000) == (512 + 64) * 2 * 61 * 1000
    q = resolve_model("qwen3-30b-a3b")
    assert rl.kv_bytes_per_token_layer(q) == 2 * q.num_kv_heads * q.head_dim * 2
    g = resolve_model("gpt-oss-20b")  # alternating sliding-window layers cache at most the window
    assert rl.kv_cache_bytes(g, 8192) < g.num_layers * 8192 * rl.kv_bytes_per_token_layer(g)


def test_prefill_attention_quadratic():
    a = rl.attention_flops_prefill(SPEC, 1000)
    b = rl.attention_flops_prefill(SPEC, 2000)
    assert 3.9 < b / a < 4.1


def test_what_if_hbm_bw_halves_memory_time():
    m = mk(hbm_bw=1e8)
    (w,) = rl.what_if(SPEC, m, ["hbm_bw=2x"], context=16)
    assert w.before.bottleneck == "memory"
    assert w.after.decode.memory_s == pytest.approx(w.before.decode.memory_s / 2)
    assert w.after.decode_tokens_per_s == pytest.approx(2 * w.before.decode_tokens_per_s)


def test_what_if_moves_the_bottleneck():
    m = mk(hbm_bw=1e10, flops=1e10, hbm_cap=1e12)
    res = rl.what_if(SPEC, m, ["flops=1000x", "hbm_bw=3TB/s"], batch=256, context=16)
    assert res[0].before.bottleneck == "compute"
    assert res[0].after.bottleneck == "memory"
    assert len(res) == 3  # each alone + both together
    text = rl.format_what_if(res)
    assert "compute -> memory" in text and "efficiency" in text


def test_what_if_sram_tier_takes_always_on():
    (w,) = rl.what_if(SPEC, mk(hbm_bw=1e9), ["sram=50MB@1TB/s"], context=16)
    sram = w.after.placement[0]
    assert sram.name == "sram" and "attention" in sram.groups and sram.kv_bytes == 0
    assert w.after.placement[1].kv_bytes > 0  # KV stays in the compute tier
    assert w.after.decode_tokens_per_s > w.before.decode_tokens_per_s
    # too small for the whole always-on set: takes the whole groups that fit, never the embedding
    (w,) = rl.what_if(SPEC, mk(), ["sram=1MB"], context=16)
    sram, hbm = w.after.placement[0], w.after.placement[1]
    assert CEN.groups["attention"].bytes > 1e6 and CEN.groups["lm_head"].bytes < 1e6
    assert "lm_head" in sram.groups and "attention" in hbm.groups and "embedding" in hbm.groups
    assert sram.used_bytes <= 1e6
    assert w.after.decode_tokens_per_s >= w.before.decode_tokens_per_s


def test_what_if_other_keys():
    m = mk(hbm_cap=AO + KV1 + 2 * EB)
    m2, _ = rl.apply_what_if(m, {}, "link_bw=100GB/s")
    assert m2.links[0].bw == 100e9
    m2, _ = rl.apply_what_if(m, {}, "pcie_bw=3x")
    assert m2.links[0].bw == 3e7
    m2, _ = rl.apply_what_if(m, {}, "host_flops=2T")
    assert m2.tier("dram").compute_flops == 2e12
    _, o = rl.apply_what_if(m, {}, "cache=1MB")
    assert o["cache_bytes"] == 1e6
    _, o = rl.apply_what_if(m, {}, "batch=64")
    assert o["batch"] == 64
    m2, _ = rl.apply_what_if(m, {}, "memory_eff=0.5")
    assert m2.efficiency.memory == 0.5


def test_host_flops_needs_a_host_tier():
    cpu_like = Machine("cpu-like", tiers=(MemoryTier("dram", 1e9, 1e9), MemoryTier("ssd", 1e10, 1e8)),
                       flops={"bf16": 1e11}, compute_tier="dram")
    with pytest.raises(MoetierError, match="host 'dram' tier"):
        rl.apply_what_if(cpu_like, {}, "host_flops=1T")
    m2, _ = rl.apply_what_if(cpu_like, {}, "ssd_flops=1T")
    assert m2.tier("ssd").compute_flops == 1e12


def test_dense_model_plans():
    r = rl.plan(resolve_model("llama-3.3-70b"), mk(hbm_cap=200e9, hbm_bw=1e12), precision="fp8", context=16)
    assert r.expert_tier.size == 0 and r.decode.expected_unique_experts == 0
    assert r.decode.memory_s == pytest.approx(
        (r.always_on_bytes - census(resolve_model("llama-3.3-70b"), "fp8").groups["embedding"].bytes
         + 8192 * 2 + r.kv_bytes) / 1e12)
    assert "dense model" in rl.format_plan(r)


@pytest.mark.parametrize("change", ["bogus=2x", "hbm_bw", "hbm_bw=-2x", "hbm_bw=fast", "nvme_bw=2x",
                                    "memory_eff=2", "batch=0", "ssd=1TB"])
def test_what_if_bad_changes(change):
    with pytest.raises(MoetierError):
        rl.what_if(SPEC, mk(), [change], context=16)


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), "batch"), (dict(batch=-3), "batch"), (dict(context=0), "context"),
    (dict(fast_mem=-1), "fast_mem"), (dict(fast_mem=0), "fast_mem"), (dict(fast_mem="lots"), "fast_mem"),
    (dict(cache_bytes=-5), "cache_bytes"), (dict(precision="int3"), "int3"),
    (dict(profile=np.ones((3, 16))), "shape"), (dict(profile=-np.ones((4, 16))), ">= 0"),
    (dict(hit_rate=1.5), "hit_rate"),
])
def test_bad_inputs(kw, match):
    with pytest.raises(MoetierError, match=match):
        rl.plan(SPEC, mk(), **{"context": 16, **kw})


def test_bad_machines():
    with pytest.raises(MoetierError, match="capacity"):
        rl.plan(SPEC, replace(mk(), tiers=(MemoryTier("hbm", 0, 1e9),)), context=16)
    with pytest.raises(MoetierError, match="no compute figure"):
        rl.plan(SPEC, replace(mk(), flops={}), context=16)


def test_does_not_fit_names_sizes():
    small = replace(mk(hbm_cap=AO + KV1 + 1), tiers=(MemoryTier("hbm", AO + KV1 + 1, 1e9),))
    with pytest.raises(MoetierError, match="does not fit") as e:
        rl.plan(SPEC, small, context=16)
    assert "hbm" in str(e.value) and "routed experts" in str(e.value)
    with pytest.raises(MoetierError, match="KV cache"):
        rl.plan(SPEC, mk(hbm_cap=1e5), context=100000, batch=64)


def test_predict_decode_from_hit_rate():
    m = mk(link_bw=1e7)
    tps = [rl.predict_decode_tokens_per_s(SPEC, m, hit_rate=h, cache_bytes=10 * EB, precision="bf16", context=16)
           for h in (0.0, 0.5, 0.9, 1.0)]
    assert tps == sorted(tps) and tps[0] < tps[-1]
    full = rl.plan(SPEC, m, context=16)  # everything in hbm
    assert tps[-1] == pytest.approx(full.decode_tokens_per_s)
    single = replace(m, tiers=m.tiers[:1], links=())
    with pytest.raises(MoetierError, match="hit_rate"):
        rl.predict_decode_tokens_per_s(SPEC, single, hit_rate=0.5, cache_bytes=None, precision="bf16")


def test_catalog_model_sanity():
    """DeepSeek-V3 int4 on an H200 + host: experts spill to host DRAM over PCIe, which binds."""
    from moetier.planner.machines import get_machine

    r = rl.plan(resolve_model("deepseek-v3"), get_machine("h200"), precision="int4")
    assert rl.plan("deepseek-v3", "h200", precision="int4").decode_tokens_per_s == r.decode_tokens_per_s
    assert r.bottleneck == "communication"
    hbm = r.placement[0]
    assert "attention" in hbm.groups and 0 < hbm.experts < 58 * 256
    assert 1 < r.decode_tokens_per_s < 100


def test_plan_cli_json_and_text(capsys, tmp_path):
    assert main(["plan", "olmoe-1b-7b", "--machine", "h100", "--json", "--batch", "4"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "bottleneck", "placement", "efficiency", "decode"):
        assert k in d
    assert d["bottleneck"] in rl.RESOURCES and d["batch"] == 4
    assert d["placement"]["groups"]["attention"] == "hbm"
    assert d["decode"]["tiers"][0]["read_bytes"] > 0
    assert main(["plan", "olmoe-1b-7b", "--machine", "h100", "--what-if", "hbm_bw=2x"]) == 0
    out = capsys.readouterr().out
    assert "hbm_bw=2x" in out and "tok/s" in out
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"expert_probability": [[1.0] * 64] * 16}))
    assert main(["plan", "olmoe-1b-7b", "--machine", "h100", "--profile", str(prof)]) == 0
    assert "tok/s" in capsys.readouterr().out
    assert main(["plan", "olmoe-1b-7b", "--machine", "h100", "--precision", "int3"]) == 2
    assert "int3" in capsys.readouterr().err


def test_profile_from_layer_counts_and_trace(tmp_path):
    counts = {0: np.bincount([5, 5, 5, 1], minlength=16), 2: np.ones(16)}
    p = rl.profile_from_layer_counts(counts, SPEC)
    assert p.shape == (4, 16) and np.allclose(p.sum(axis=1), 2)
    assert p[0, 5] == p[0].max() and np.allclose(p[1], 2 / 16)  # layer 1 had no counts: uniform
    with pytest.raises(MoetierError, match="not a MoE layer"):
        rl.profile_from_layer_counts({7: np.ones(16)}, SPEC)
    from moetier.traces.format import make_trace, save_trace

    ids = np.array([[5, 1], [5, 2], [5, 3], [4, 5]] * 4, dtype=np.int32)
    layer = np.repeat(np.arange(4, dtype=np.int32), 4)
    path = save_trace(make_trace(topk_ids=ids, layer=layer, meta={"num_experts": 16, "model": "tiny"}),
                      tmp_path / "t.npz")
    prof = rl.load_profile(path, SPEC)
    assert (prof.argmax(axis=1) == 5).all()
    r = rl.plan(SPEC, mk(hbm_cap=AO + KV1 + 4.5 * EB), context=16, profile=prof)
    assert (r.expert_tier[:, 5] == 0).all()


def test_plan_cli_what_if_json_and_checkpoint_precision(capsys):
    assert main(["plan", "olmoe-1b-7b", "--machine", "h100", "--what-if", "flops=2x", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["what_if"][0]["change"] == "flops=2x"
    assert d["what_if"][0]["after"]["decode"]["times_s"]["compute"] == pytest.approx(
        d["before"]["decode"]["times_s"]["compute"] / 2)
    assert main(["plan", "gpt-oss-20b", "--machine", "h100", "--precision", "checkpoint", "--json",
                 "--no-overlap"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "routed_experts=fp4" in d["precision"] and d["overlap"] is False
    t = d["decode"]["times_s"]
    assert d["decode"]["step_time_s"] == pytest.approx(t["compute"] + t["memory"] + t["communication"])


def test_load_profile_reads_the_embedded_models_routing_profile():
    from pathlib import Path

    import numpy as np

    import moetier
    from moetier.planner.roofline import load_profile
    from moetier.spec import load_spec

    d = Path(moetier.__file__).parent / "data" / "embedded"
    spec = load_spec(d)
    p = load_profile(d / "routing_profile.json", spec)
    assert p.shape == (spec.num_moe_layers, spec.num_experts)
    assert np.allclose(p.sum(axis=1), spec.top_k)
    # the embedded model routes non-uniformly: its hottest expert is well above top_k / E
    assert p.max() > 2 * spec.top_k / spec.num_experts


_KERNEL_REC = {"ram_bytes": 1e10, "memory_read_bw": 1e12, "disk_free_bytes": 1e11, "disk_read_bw": 1e9,
               "matmul_flops": {"fp32": 1e15, "bf16": 1e15}, "timestamp": 0.0,
               "kernel_rates": {"bf16": 2e9, "int4:g32": 1e9, "int4:g128": 4e9}}


def test_decode_bound_takes_the_measured_kernel_rate_when_it_is_slower_than_memory():
    """`moetier probe` records the native decode GEMV's weights/s per stored format; where the
    kernels overlap memory (``kernels_add_to_memory=False``: an accelerator's load units) a
    decode step needs at least every matrix's params / its format's rate (fed probe dict, no
    timing)."""
    from moetier.planner.probe import machine_from_probe

    rec = _KERNEL_REC
    m = replace(machine_from_probe(rec), kernels_add_to_memory=False)
    cen = census(SPEC, "int4:g32")
    # by hand: embedding is a row copy, norms are vectors; keep-high groups (LM head, router) are bf16
    g = cen.groups
    want = ((g["lm_head"].params + g["router"].params) / 2e9 + g["attention"].params / 1e9
            + 4 * 2 * cen.expert_params / 1e9)  # 4 MoE layers x top-2 experts at batch 1
    r = rl.plan(SPEC, m, precision="int4:g32", context=16)
    assert r.decode.compute_s == pytest.approx(want) and r.decode.kernel_s == pytest.approx(want)
    assert r.decode.kernel_mode == "max" and r.decode.memory_s < want and r.bottleneck == "compute"
    assert r.decode_tokens_per_s == pytest.approx(1 / want)
    assert any("kernel rates" in a for a in r.assumptions)
    # an unmeasured group size takes the nearest measured one of the same width (g64 -> g32)
    assert m.kernel_rate("int4:g64") == 1e9 and m.kernel_rate("int4:g100") == 4e9 and m.kernel_rate("fp8") is None
    # kernels faster than memory: the memory bound stands, as without kernel rates
    fast = replace(machine_from_probe({**rec, "memory_read_bw": 1e9, "kernel_rates": {"bf16": 1e15, "int4:g32": 1e15}}),
                   kernels_add_to_memory=False)
    none = machine_from_probe({**rec, "memory_read_bw": 1e9, "kernel_rates": {}})
    r_fast, r_none = (rl.plan(SPEC, x, precision="int4:g32", context=16) for x in (fast, none))
    assert r_fast.bottleneck == "memory"
    assert r_fast.decode_tokens_per_s == pytest.approx(r_none.decode_tokens_per_s)
    # prefill (many tokens per step) is not a GEMV: unchanged by kernel rates
    assert r.prefill.compute_s == pytest.approx(rl.plan(SPEC, replace(m, kernel_rates={}), precision="int4:g32",
                                                        context=16).prefill.compute_s)


def test_cpu_decode_bound_adds_kernel_time_to_memory_time():
    """On the probed CPU the same cores stream the weights and run the dequantizing kernels, and
    measured decode steps show the two add (bench/README.md, 2026-12-02): the decode bound is
    bytes / bandwidth + weights / kernel rate, named "memory+compute"; a format without a kernel
    rate keeps the plain memory bound; prefill and non-CPU machines are unchanged."""
    from moetier.planner.probe import machine_from_probe

    rec = {**_KERNEL_REC, "memory_read_bw": 1e9}
    m = machine_from_probe(rec)
    assert m.kernels_add_to_memory
    cen = census(SPEC, "int4:g32")
    g = cen.groups
    kernel = ((g["lm_head"].params + g["router"].params) / 2e9 + g["attention"].params / 1e9
              + 4 * 2 * cen.expert_params / 1e9)
    r = rl.plan(SPEC, m, precision="int4:g32", context=16)
    d = r.decode
    assert d.kernel_mode == "add" and d.kernel_s == pytest.approx(kernel)
    assert d.memory_s == pytest.approx(d.tiers[0].read_bytes / 1e9)  # bytes / bandwidth, as before
    assert d.step_time_s == pytest.approx(d.memory_s + kernel)  # the sum, not max(memory, kernel)
    assert d.step_time_s > 1.5 * max(d.memory_s, kernel)  # both terms matter in this case
    assert r.bottleneck == "memory+compute" and r.decode_tokens_per_s == pytest.approx(1 / (d.memory_s + kernel))
    assert d.compute_s < kernel  # the kernel time is not also counted as FLOP compute
    assert d.to_json()["times_s"]["memory+compute"] == pytest.approx(d.memory_s + kernel)
    text = rl.format_plan(r)
    assert "bound by memory+compute" in text and "added to memory" in text
    assert any("adds to memory time" in a for a in r.assumptions)
    # formats without a kernel rate (bf16, fp8 + its bf16 LM head / router here): exactly the
    # memory bound of a machine without kernel rates, named "memory"
    only_int4, none = replace(m, kernel_rates={"int4:g32": 1e9}), replace(m, kernel_rates={})
    for prec in ("bf16", "fp8"):
        a, b = (rl.plan(SPEC, x, precision=prec, context=16) for x in (only_int4, none))
        assert a.decode.kernel_s == 0.0 and a.bottleneck == "memory" == b.bottleneck
        assert a.decode_tokens_per_s == pytest.approx(b.decode_tokens_per_s)
    # the same machine marked as overlapping (accelerator-like) takes the max instead
    ov = rl.plan(SPEC, replace(m, kernels_add_to_memory=False), precision="int4:g32", context=16)
    assert ov.decode.step_time_s == pytest.approx(max(d.memory_s, kernel))
    # prefill (many tokens per step) is not a GEMV: unchanged
    assert r.prefill.step_time_s == pytest.approx(
        rl.plan(SPEC, replace(m, kernel_rates={}), precision="int4:g32", context=16).prefill.step_time_s)
    # overlap=False already adds every resource: the kernel time is a compute floor there, not counted twice
    no = rl.plan(SPEC, m, precision="int4:g32", context=16, overlap=False).decode
    assert no.kernel_mode == "max" and no.step_time_s == pytest.approx(
        max(no.compute_s, kernel) + no.memory_s + no.communication_s)
