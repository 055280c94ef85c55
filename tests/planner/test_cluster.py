"""Cluster planner (moetier.planner.cluster, whatif_cluster): model terms, layouts, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moetier.catalog import resolve_model
from moetier.cli import main
from moetier.planner import cluster, cluster_cli, whatif_cluster
from moetier.planner.calibration import DEFAULT, calibration_for
from moetier.planner.cluster import ClusterError, Layout, plan_cluster
from moetier.planner.machines import get_machine


@pytest.fixture(scope="module")
def ds():
    return resolve_model("deepseek-v3")


@pytest.fixture(scope="module")
def h800():
    return get_machine("h800")


def _plan(spec, m, **kw):
    return plan_cluster(spec, m, Layout(**kw), precision="fp8")


def test_one_fitted_calibration_chip_facts_differ(h800):
    """One fitted set for every machine; the chip differences come from cited per-chip constants."""
    gb = get_machine("gb200")
    assert calibration_for(h800) is DEFAULT and calibration_for(gb) is DEFAULT
    r1 = _plan(resolve_model("deepseek-v3"), h800, devices=8, batch=64, context=2048)
    r2 = _plan(resolve_model("deepseek-v3"), gb, devices=8, batch=64, context=2048)
    assert r1.chip.family == "hopper" and r2.chip.family == "blackwell"
    assert r1.chip.mma_m == 64 and r2.chip.mma_m == 128


def test_mla_kv_bytes_per_token(ds):
    sh = cluster.model_shape(ds, "fp8")
    # DeepSeek caches kv_lora_rank + qk_rope_head_dim values per token per layer
    assert cluster.kv_bytes_per_token(sh, "bf16") == (512 + 64) * 2 * 61
    assert cluster.kv_bytes_per_token(sh, "fp8") == (512 + 64) * 61


def test_gqa_kv_bytes_per_token():
    q = resolve_model("qwen3-235b-a22b")
    sh = cluster.model_shape(q, "bf16")
    assert cluster.kv_bytes_per_token(sh, "bf16") == 2 * q.num_kv_heads * q.head_dim * 2 * q.num_layers


def test_routed_expert_flops_and_weight_bytes(ds, h800):
    r = _plan(ds, h800, devices=144, batch=100, context=4096, imbalance=1.0, redundant_experts=32)
    routed = next(o for o in r.ops if o.name == "routed experts")
    e_params = 3 * 7168 * 2048
    assert routed.flops == pytest.approx(2 * e_params * 100 * 8 * 58)
    # 288 slots over 144 devices = 2 local experts, read once per micro-batch (two-batch overlap)
    sh = cluster.model_shape(ds, "fp8")
    assert routed.weight_bytes == pytest.approx(2 * sh.expert_bytes * 58 * 2 * (1 - math.exp(-100 * 8 / 2 / 2)))


def test_decode_all_to_all_bytes_direct(ds, h800):
    r = _plan(ds, h800, devices=144, batch=64, context=2048, imbalance=1.0)
    c = r.comm
    assert c.mode == "direct"
    pair = 7168 * (1 + 4 / 128) + 2 * 7168  # FP8 dispatch + scales, BF16 combine
    assert c.scale_out_bytes == pytest.approx(64 * 8 * (144 - 8) / 144 * pair)
    assert c.scale_up_bytes == pytest.approx(64 * 8 * 7 / 144 * pair)
    assert c.frac_inside == pytest.approx(7 / 143)
    # BF16 dispatch moves more bytes
    r2 = _plan(ds, h800, devices=144, batch=64, context=2048, imbalance=1.0, dispatch_dtype="bf16")
    assert r2.comm.scale_out_bytes > c.scale_out_bytes and r2.comm_s > r.comm_s


def test_prefill_dedup_uses_node_limited_routing(ds, h800):
    r = _plan(ds, h800, devices=32, phase="prefill", batch=4096, context=4096, imbalance=1.0)
    c = r.comm
    assert c.mode == "dedup"
    # 4 nodes x 2 groups each; top-4 of 8 groups: a node is missed with C(6,4)/C(8,4)
    p_hit = 1 - math.comb(6, 4) / math.comb(8, 4)
    pair = 7168 * (1 + 4 / 128) + 2 * 7168
    assert c.scale_out_bytes == pytest.approx(4096 * 3 * p_hit * pair)


def test_ep_inside_scale_up_domain_has_no_scale_out(ds, h800):
    m = h800.with_changes(scale_up_domain=72, scale_up_bw=900e9)
    r = _plan(ds, m, devices=72, batch=64, context=4096)
    assert r.comm.scale_out_bytes == 0 and r.comm.scale_up_bytes > 0


def test_overlap_and_sums(ds, h800):
    on = _plan(ds, h800, devices=144, batch=96, context=4096)
    off = _plan(ds, h800, devices=144, batch=96, context=4096, two_batch_overlap=False)
    assert off.hidden_s == 0
    assert off.step_s == pytest.approx(off.compute_s + off.memory_s + off.comm_s + off.latency_s)
    assert on.step_s == pytest.approx(on.compute_s + on.memory_s + on.comm_s + on.latency_s - on.hidden_s)
    assert on.hidden_s > 0
    assert sum(on.shares.values()) == pytest.approx(1.0)


def test_batch_trades_user_speed_for_throughput(ds, h800):
    small = _plan(ds, h800, devices=144, batch=16, context=4096)
    big = _plan(ds, h800, devices=144, batch=128, context=4096)
    assert big.tokens_per_s_per_device > small.tokens_per_s_per_device
    assert big.tokens_per_s_per_user < small.tokens_per_s_per_user
    assert big.tokens_per_s_per_node == pytest.approx(8 * big.tokens_per_s_per_device)


def test_more_hbm_bandwidth_never_slower(ds, h800):
    base = _plan(ds, h800, devices=144, batch=64, context=4096)
    m, lay, _ = whatif_cluster.apply_change(ds, h800, base.layout, "hbm_bw=2x")
    fast = plan_cluster(ds, m, lay, precision="fp8")
    assert fast.memory_s < base.memory_s
    assert fast.step_s <= base.step_s


def test_imbalance_slows_the_step(ds, h800):
    bal = _plan(ds, h800, devices=144, batch=64, context=4096, imbalance=1.0)
    skew = _plan(ds, h800, devices=144, batch=64, context=4096, imbalance=1.5)
    assert skew.comm_s == pytest.approx(bal.comm_s * 1.5, rel=0.05)
    assert skew.tokens_per_s_per_node < bal.tokens_per_s_per_node
    # modelled imbalance: replication of a skewed profile helps
    z0 = _plan(ds, h800, devices=144, batch=64, context=4096, routing_zipf=0.6)
    z1 = _plan(ds, h800, devices=144, batch=64, context=4096, routing_zipf=0.6, redundant_experts=32)
    assert z1.imbalance < z0.imbalance
    assert z1.tokens_per_s_per_node > z0.tokens_per_s_per_node


def test_capacity_bottleneck(ds, h800):
    r = plan_cluster(ds, h800, Layout(devices=8, batch=32, context=4096), precision="bf16")
    assert not r.feasible and r.bottleneck == "capacity"


def test_mtp_raises_user_speed(ds, h800):
    plain = _plan(ds, h800, devices=144, batch=64, context=4096)
    mtp = _plan(ds, h800, devices=144, batch=64, context=4096, mtp_tokens=1, mtp_acceptance=0.85)
    assert mtp.tokens_per_s_per_user > plain.tokens_per_s_per_user


def test_tp_replicates_mla_cache(ds, h800):
    tp1 = _plan(ds, h800, devices=16, batch=32, context=4096)
    tp2 = _plan(ds, h800, devices=16, tp=2, batch=32, context=4096)
    assert tp2.kv_bytes == pytest.approx(2 * tp1.kv_bytes)
    assert tp2.tp_comm_s > 0 and tp1.tp_comm_s == 0


@pytest.mark.parametrize("kw,match", [
    (dict(devices=16, dp=4, tp=2), "dp x tp"),
    (dict(devices=16, ep=5), "ep"),
    (dict(devices=16, phase="train"), "phase"),
    (dict(devices=16, batch=0), "batch"),
    (dict(devices=16, cached_fraction=1.0), "cached-fraction"),
    (dict(devices=16, imbalance=0.5), "imbalance"),
    (dict(devices=16, dispatch_dtype="int4"), "dispatch-dtype"),
    (dict(devices=512, ep=512), "ep"),
])
def test_layout_errors_name_the_parameter(ds, h800, kw, match):
    with pytest.raises(ClusterError, match=match):
        _plan(ds, h800, **kw)


def test_search_meets_target(ds, h800):
    base = Layout(devices=32, context=4096)
    sr = cluster.search(ds, h800, base, 25.0, precision="fp8")
    assert sr.best is not None and sr.best.feasible
    assert sr.best.tokens_per_s_per_user >= 25.0 - 1e-6
    assert all(sr.best.tokens_per_s_per_node >= t.tokens_per_s_per_node for t in sr.top)
    strict = cluster.search(ds, h800, base, 40.0, precision="fp8")
    assert strict.best is None or strict.best.tokens_per_s_per_node <= sr.best.tokens_per_s_per_node


def test_what_if_chain_memory_falls_communication_rises(ds, h800):
    lay = Layout(devices=144, batch=90, context=4989, redundant_experts=32)
    steps = whatif_cluster.what_if_chain(ds, h800, lay, ["sram=weights@10x", "scale_out_bw=4x", "domain=144"],
                                         precision="fp8")
    base, sram, optical, domain = (s.result for s in steps)
    assert sram.memory_s < base.memory_s / 5
    assert sram.shares["communication"] > base.shares["communication"]  # the seed's chain
    assert optical.comm_s < sram.comm_s
    assert domain.comm.scale_out_bytes == 0
    text = whatif_cluster.format_chain(steps)
    assert "SRAM" in text and "bottleneck" in text
    with pytest.raises(Exception, match="KEY=VALUE"):
        whatif_cluster.apply_change(ds, h800, lay, "warp=9")


def test_gqa_model_plans(h800):
    q = resolve_model("qwen3-235b-a22b")
    r = plan_cluster(q, h800, Layout(devices=16, batch=16, context=4096), precision="fp8")
    assert r.feasible and r.tokens_per_s_per_device > 0
    dense = resolve_model("llama-3.3-70b")
    r = plan_cluster(dense, h800, Layout(devices=8, tp=8, dp=1, batch=32, context=4096), precision="fp8")
    assert r.comm is None and r.tp_comm_s > 0


# ---- CLI


def test_cli_json_keys(ds, capsys):
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "144", "--precision", "fp8",
               "--batch-per-device", "64", "--context", "4096", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for k in ("tokens_per_s_per_device", "tokens_per_s_per_node", "tokens_per_s_per_user", "bottleneck"):
        assert k in doc
    assert doc["tokens_per_s_per_node"] == pytest.approx(8 * doc["tokens_per_s_per_device"])


def test_cli_explain_and_what_if_plot(tmp_path, capsys):
    png = tmp_path / "shares.png"
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "32", "--phase", "prefill",
               "--precision", "fp8", "--batch-per-device", "8192", "--explain", "--what-if", "chain",
               "--what-if-plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "binding resource" in out and "all-to-all per MoE layer" in out
    assert "bottleneck migration" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_and_errors(capsys):
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "32", "--precision", "fp8",
               "--search", "--target-tps-per-user", "20", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tokens_per_s_per_user"] >= 20 - 1e-6 and doc["search"]["considered"] > 10
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "32", "--search"])
    assert rc == 2 and "--target-tps-per-user" in capsys.readouterr().err
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "16", "--ep", "5"])
    assert rc == 2 and "ep" in capsys.readouterr().err


def test_cli_routing_profile(tmp_path, capsys):
    from moetier.planner import eplb

    prof = tmp_path / "loads.json"
    prof.write_text(json.dumps(list(eplb.zipf_loads(256, 0.6))))
    outs = []
    for red in ("0", "32"):
        rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "32", "--precision", "fp8",
                   "--routing-profile", str(prof), "--redundant-experts", red, "--json"])
        assert rc == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[1]["imbalance"] < outs[0]["imbalance"]
    rep = outs[1]["replication"]
    assert [r["redundant_experts"] for r in rep] == [0, 0, 32]
    assert rep[2]["tokens_per_s_per_node"] > rep[0]["tokens_per_s_per_node"]
    assert rep[2]["placement_imbalance"] < rep[1]["placement_imbalance"] <= rep[0]["placement_imbalance"] + 1e-9
    assert outs[0]["imbalance_cost_tokens_per_s_per_node"] > outs[1]["imbalance_cost_tokens_per_s_per_node"]
    bad = tmp_path / "short.json"
    bad.write_text("[1, 2, 3]")
    rc = main(["plan", "deepseek-v3", "--machine", "h800", "--devices", "32", "--routing-profile", str(bad)])
    assert rc == 2 and "routing-profile" in capsys.readouterr().err


def test_layout_replace_keeps_validation(ds, h800):
    lay = Layout(devices=144, batch=64, context=4096)
    r = plan_cluster(ds, h800, replace(lay, ep=72), precision="fp8")
    assert r.layout.ep == 72
    sh = cluster.model_shape(ds, "fp8")
    assert r.weight_bytes > plan_cluster(ds, h800, lay, precision="fp8").weight_bytes
    assert sh.n_moe == 58


def test_search_keeps_every_parallelism_flag_given(capsys):
    main(["plan", "deepseek-v3", "--machine", "gb200", "--precision", "fp8", "--devices", "72", "--ep", "72",
          "--search", "--target-tps-per-user", "20", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"]["fixed"] == ["ep"]
    assert doc["ep"] == 72 and all(t["ep"] == 72 for t in doc["search"]["top"])
    assert len({t["tp"] for t in doc["search"]["top"]}) >= 1
    main(["plan", "deepseek-v3", "--machine", "gb200", "--precision", "fp8", "--devices", "72", "--ep", "72",
          "--tp", "2", "--search", "--target-tps-per-user", "20", "--explain"])
    text = capsys.readouterr().out
    assert "ep                 72  (set by you)" in text and "tp                 2  (set by you)" in text
    assert "chosen layout: ep 72, dp 36, tp 2" in text


def test_search_without_flags_varies_ep(ds, h800):
    base = cluster.validate(Layout(devices=32, batch=64, context=2048), ds, h800)
    sp = cluster.search_space(ds, h800, base)
    assert len(sp["ep"]) > 1 and len(sp["tp"]) > 1
    fixed = cluster.search_space(ds, h800, base, {"ep", "tp"})
    assert fixed["ep"] == [32] and fixed["tp"] == [1]


def test_units_a_person_reads():
    assert cluster_cli.fmt_time(0.472455) == "472 ms"
    assert cluster_cli.fmt_time(0.0034567) == "3.46 ms"
    assert cluster_cli.fmt_time(8.53e-5) == "85.3 us"
    assert cluster_cli.fmt_time(1.5) == "1.5 s"
    assert cluster_cli.fmt_count(89.4784) == "89"
    assert cluster_cli.fmt_count(1408) == "1,408"
    assert cluster_cli.fmt_count(2.345) == "2.3"
    assert cluster_cli.fmt_count(0.125) == "0.12"


def test_plan_prints_uncertainty_band_and_readable_units(capsys):
    main(["plan", "deepseek-v3", "--machine", "h800", "--precision", "fp8", "--devices", "144",
          "--batch-per-device", "89.4784", "--explain"])
    text = capsys.readouterr().out
    assert "uncertainty:" in text and "leave-one-chip-out" in text
    assert "batch 89 requests/device" in text
    assert "472.455m" not in text and not any(w.endswith("m") and w[:-1].replace(".", "").isdigit()
                                              for w in text.split())


def test_padding_to_the_tensor_core_tile(ds, h800):
    """A decode GEMM with fewer token rows than the tile executes the whole tile."""
    r = _plan(ds, h800, devices=256, batch=4, context=1024, imbalance=1.0, two_batch_overlap=False)
    routed = next(o for o in r.ops if o.name == "routed experts")
    assert routed.padded_flops > routed.flops  # 4 x 8 / 2 slots = 16 rows per expert < 64
    assert routed.bound in ("memory", "latency")


def test_fabric_latency_floor_per_collective(ds, h800):
    r = _plan(ds, h800, devices=144, batch=2, context=1024, imbalance=1.0)
    c = r.comm
    # two phases (dispatch, combine) x two micro-batches x the InfiniBand floor
    assert r.micro_batches == 2
    assert c.latency_s == pytest.approx(4 * r.fabrics.scale_out.alpha_s)
    assert "InfiniBand" in c.fabric


def test_two_batch_overlap_needs_two_requests(ds, h800):
    """One request cannot be split into two micro-batches: the step runs as one (no doubled weight
    reads and launch floors, nothing hidden), the same as with overlap switched off."""
    one = _plan(ds, h800, devices=144, batch=1, context=1024, imbalance=1.0)
    off = _plan(ds, h800, devices=144, batch=1, context=1024, imbalance=1.0, two_batch_overlap=False)
    two = _plan(ds, h800, devices=144, batch=2, context=1024, imbalance=1.0)
    assert one.micro_batches == 1 and two.micro_batches == 2
    assert one.step_s == pytest.approx(off.step_s) and one.hidden_s == 0.0
    assert one.comm.latency_s == pytest.approx(2 * one.fabrics.scale_out.alpha_s)
    # a TP group of 8 shares its requests: 0.25 per device is 2 per group, enough to split
    tp = _plan(ds, h800, devices=8, tp=8, ep=8, batch=0.25, context=1024, imbalance=1.0)
    assert tp.micro_batches == 2


def test_user_speed_batch_search_brackets_the_target(ds, h800):
    """The batch found meets the target and a batch ``tol`` larger does not (checked directly)."""
    lay = Layout(devices=144, context=4989, redundant_experts=32)
    for target in (15.0, 21.0, 40.0):
        r = cluster.batch_for_user_speed(ds, h800, lay, target, precision="fp8")
        assert r.tokens_per_s_per_user >= target
        nxt = plan_cluster(ds, h800, replace(lay, batch=r.layout.batch + 0.25), precision="fp8")
        assert nxt.tokens_per_s_per_user < target


def test_search_with_ep_above_expert_count_keeps_it(capsys):
    assert main(["plan", "deepseek-v3", "--machine", "ascend-910c", "--precision", "int8", "--devices", "320",
                 "--ep", "320", "--search", "--target-tps-per-user", "20", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(t["ep"] == 320 for t in doc["search"]["top"])
    assert all(t["layout"]["redundant_experts"] >= 64 for t in doc["search"]["top"])


def test_batch_one_across_a_tp_group_reads_as_one_request(capsys):
    main(["plan", "deepseek-v3", "--machine", "b200", "--precision", "mixed:attention=bf16,ffn=nvfp4",
          "--devices", "8", "--tp", "8", "--ep", "8", "--batch-per-device", "0.125", "--no-overlap"])
    text = capsys.readouterr().out
    assert "1 request per TP group of 8 (0.12/device)" in text
    assert "bottleneck: latency" in text
