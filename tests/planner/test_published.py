"""Published measurements: the calibration set, the fit, leave-one-chip-out validation, the CLI.

Figures: moetier/data/published/*.json (each with conditions and source). ONE fitted set of
global factors (moetier.planner.calibration.DEFAULT) is used for all of them; chip and fabric
differences are cited constants (moetier.planner.efficiency).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moetier.planner import calibration, published
from moetier.planner.calibration import DEFAULT


@pytest.fixture(scope="module")
def figs():
    return published.load()


@pytest.fixture(scope="module")
def validation(figs):
    v = published.shipped_validation()
    assert [r["id"] for r in v.rows] == [f.id for f in figs]
    return v


def test_calibration_set_covers_chips_fabrics_models_regimes(figs):
    assert len(figs) >= 10
    assert len({f.chip for f in figs}) >= 4
    assert len({f.fabric for f in figs}) >= 3
    models = {f.model for f in figs}
    assert "deepseek-v3" in models and len(models) >= 2
    regimes = " ".join(f.regime for f in figs)
    assert "batch-1" in regimes and "NVL72" in regimes
    for f in figs:
        assert f.source and f.conditions and f.published and f.confidence, f.id


def test_deepseek_h800_figures_within_20_percent(figs):
    h800 = [f for f in figs if f.chip == "h800"]
    assert len(h800) == 4
    for f in h800:
        p = published.predict(f, DEFAULT)
        assert p.result.feasible
        assert abs(p.error) < 0.20, f"{f.id}: predicted {p.value:,.0f}, published {f.value:,.0f}"


def test_production_decode_operating_point(figs):
    f = next(f for f in figs if f.id == "deepseek-h800-prod-decode")
    r = published.predict(f).result
    assert 20.0 <= r.tokens_per_s_per_user <= 22.0
    assert 70 <= r.layout.batch <= 110  # DeepSeek: ~1,850 tok/s per GPU at ~21 tok/s per user


def test_stored_fit_is_what_the_fit_finds(figs, validation):
    """The constants in calibration.py are the fit's result, not hand-tuned."""
    c = published.fit(figs, validation.table)
    assert (c.overhead, c.overlap, c.floor_scale, c.eplb_residual) == (
        DEFAULT.overhead, DEFAULT.overlap, DEFAULT.floor_scale, DEFAULT.eplb_residual)


def test_fit_ignores_figures_marked_not_fitted(figs, validation):
    not_fitted = [f for f in figs if not f.fit]
    assert not_fitted  # the inferred-conditions figure is reported, not fitted
    t = validation.table
    assert published.fit(figs, t) == published.fit([f for f in figs if f.fit], t)


def test_fit_is_the_global_grid_optimum(figs, validation):
    """No grid point has a smaller largest error than the fit (so no start point biases a LOCO fit)."""
    fitted = [f for f in figs if f.fit]
    c = published.fit(fitted, validation.table)
    key = tuple(getattr(c, k) for k in published.GRID)
    worst = published._loss([validation.table.error(f, key) for f in fitted])
    others = list(published._combos())[::37]  # a spread sample of the grid, recomputed independently
    for combo in others:
        errs = published.log_errors(fitted, published._calibration(combo))
        assert published._loss(errs) >= worst


def test_loco_constants_match_validation(validation):
    """The band printed with every plan comes from the leave-one-chip-out errors computed here."""
    assert validation.n_fitted == calibration.N_FIGURES
    assert validation.loco_median == pytest.approx(calibration.LOCO_MEDIAN_ABS, abs=0.01)
    assert validation.loco_max == pytest.approx(calibration.LOCO_MAX_ABS, abs=0.01)
    chips = {r["chip"] for r in validation.rows}
    assert len(chips) >= 4
    # each chip's LOCO calibration was fitted without that chip: refit and compare
    r = next(r for r in validation.rows if r["chip"] == "gb200")
    rest = [f for f in published.load() if f.chip != "gb200"]
    assert published.fit(rest, validation.table) == r["loco_calibration"]


def test_targets_in_sample_and_leave_one_chip_out(validation):
    """Issue targets, computed by the code: in-sample every fitted figure within 20%; leaving each
    chip out, the median within 20% and every figure within 35%; no prediction of zero."""
    rows = [r for r in validation.rows if r["fit"]]
    assert len(rows) >= 10
    for r in rows:
        assert abs(r["in_sample_error"]) <= 0.20, (r["id"], r["in_sample_error"])
        assert abs(r["loco_error"]) <= 0.35, (r["id"], r["loco_error"])
        assert r["loco"] > 0 and r["in_sample"] > 0, r["id"]
    assert validation.in_sample_max <= 0.20
    assert validation.loco_median <= 0.20
    assert validation.loco_max <= 0.35


def test_regimes_validated(validation, figs):
    """Batch-1 minimum latency (TP across a node) and max-throughput decode on an NVL72 domain are
    among the fitted, validated figures, within the targets."""
    by_id = {r["id"]: r for r in validation.rows}
    fitted = {f.id: f for f in figs if f.fit}
    b1 = [i for i, f in fitted.items() if "batch-1" in f.regime and dict(f.layout).get("tp", 1) >= 8]
    nvl = [i for i, f in fitted.items() if "NVL72" in f.regime]
    assert b1 and nvl
    for i in b1 + nvl:
        assert abs(by_id[i]["loco_error"]) <= 0.35 and abs(by_id[i]["in_sample_error"]) <= 0.20


def test_gb200_fp4_experts_credited_where_expert_gemms_bind(figs):
    f8 = next(f for f in figs if f.id == "sglang-gb200-decode-fp8")
    lay = f8.layout_obj()
    from moetier.catalog import resolve_model
    from moetier.planner.cluster import plan_cluster
    from moetier.planner.machines import get_machine

    ds, gb = resolve_model("deepseek-v3"), get_machine("gb200")
    a = plan_cluster(ds, gb, lay, precision="fp8")
    b = plan_cluster(ds, gb, lay, precision="mixed:default=fp8,routed=nvfp4,shared=nvfp4")
    ea = next(o for o in a.ops if o.name == "routed experts")
    eb = next(o for o in b.ops if o.name == "routed experts")
    assert ea.bound == "compute" and ea.precision == "fp8" and eb.precision == "fp4"
    assert eb.compute_s == pytest.approx(ea.compute_s / 2, rel=1e-6)  # FP4 tensor cores: 2x FP8 peak
    assert b.tokens_per_s_per_device > a.tokens_per_s_per_device
    # Hopper has no FP4 tensor cores: FP4 weights compute at the FP8 rate (bytes still shrink)
    h = get_machine("h100")
    hl = lay.__class__(devices=64, batch=256, context=2000)
    ha = plan_cluster(ds, h, hl, precision="fp8")
    hb = plan_cluster(ds, h, hl, precision="mixed:default=fp8,routed=fp4")
    ra = next(o for o in ha.ops if o.name == "routed experts")
    rb = next(o for o in hb.ops if o.name == "routed experts")
    assert rb.precision == "fp8" and rb.flop_rate == pytest.approx(ra.flop_rate) and rb.memory_s < ra.memory_s


def test_batch1_is_bound_by_kernel_floors(figs):
    f = next(f for f in figs if "batch1" in f.id)
    r = published.predict(f).result
    assert r.bottleneck == "latency"
    assert r.latency_s > r.memory_s + r.compute_s


def test_malformed_file_names_file_and_key(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"figures": [{"id": "x", "model": "deepseek-v3"}]}))
    with pytest.raises(published.PublishedError, match=r"bad.json: figures\[0\]: missing key 'machine'"):
        published.load(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"figures": [{
        "id": "x", "model": "deepseek-v3", "machine": "h100", "precision": "fp8", "metric": "furlongs",
        "value": 1, "layout": {"devices": 8}}]}))
    with pytest.raises(published.PublishedError, match="metric"):
        published.load(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"figures": [{
        "id": "x", "model": "deepseek-v3", "machine": "h100", "precision": "fp8",
        "metric": "output tokens/s per device", "value": 1, "layout": {"devices": 8, "batch": [64]}}]}))
    with pytest.raises(published.PublishedError, match=r"bad.json: figures\[0\].layout.batch: expected a number"):
        published.load(tmp_path)


def test_calibration_imports_nothing_from_the_cluster_planner():
    code = ("import sys, moetier.planner.calibration, moetier.planner.efficiency; "
            "bad = [m for m in sys.modules if m.endswith(('.cluster', '.whatif_cluster', '.published'))]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_published(capsys, validation):
    from moetier.cli import main

    assert main(["plan", "deepseek-v3", "--machine", "h800", "--published", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = doc["published"]
    assert len(rows) == len(published.load())
    for r in rows:
        assert r["predicted"] > 0 and "loco_error" in r and r["source"]
        assert r["error"] == pytest.approx(r["predicted"] / r["published"] - 1)
    assert doc["loco_median_abs"] == pytest.approx(validation.loco_median)
    assert main(["plan", "deepseek-v3", "--machine", "h800", "--published"]) == 0
    text = capsys.readouterr().out
    assert "leave-one-chip-out" in text and "LOCO" in text
    assert "targets: in-sample every figure within 20% met" in text and "MISSED" not in text


def test_factors_not_read_leave_the_prediction_unchanged(figs):
    """The error table skips the factors a figure does not read: check that they really don't matter."""
    from dataclasses import replace

    for f in figs:
        rel = published.relevant_factors(f)
        base = published.predict(f, DEFAULT).value
        for k, values in published.GRID.items():
            if k in rel:
                continue
            for v in (values[0], values[-1]):
                got = published.predict(f, replace(DEFAULT, **{k: v})).value
                assert got == pytest.approx(base, rel=1e-12), (f.id, k)
    assert any(len(published.relevant_factors(f)) < len(published.GRID) for f in figs)


def test_docs_table_is_generated_from_the_validation(validation, figs):
    """docs/cluster-planner.md holds the table the code produces (regenerate with
    ``python -c "from moetier.planner import published as p; print(p.markdown_table(p.validate()))"``)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cluster-planner.md").read_text(encoding="utf-8")
    start, end = "<!-- published-table:start -->\n", "\n<!-- published-table:end -->"
    assert start in doc and end in doc
    block = doc[doc.index(start) + len(start):doc.index(end)]
    assert block == published.markdown_table(validation, figs)


def test_gb200_fp4_over_fp8_step_close_to_published(validation, figs):
    """GB200 NVFP4 vs FP8 MoE decode: the predicted ratio is within 20% of the published 1.47x."""
    by_id = {r["id"]: r for r in validation.rows}
    a, b = by_id["sglang-gb200-decode-fp8"], by_id["sglang-gb200-decode-nvfp4"]
    pub = b["published"] / a["published"]
    pred = b["in_sample"] / a["in_sample"]
    assert pub > 1.4 and abs(pred / pub - 1) <= 0.20


def test_loco_prediction_ignores_the_left_out_chips_values(figs, validation):
    """No leak: scaling a chip's published values by 3 changes its in-sample fit target but not its
    leave-one-chip-out prediction (that fit never reads them)."""
    from dataclasses import replace

    moved = tuple(replace(f, value=f.value * 3) if f.chip == "gb200" else f for f in figs)
    v2 = published.validate(moved, DEFAULT, table=validation.table)
    a = {r["id"]: r for r in validation.rows if r["chip"] == "gb200"}
    b = {r["id"]: r for r in v2.rows if r["chip"] == "gb200"}
    assert a and a.keys() == b.keys()
    for k in a:
        assert b[k]["loco"] == pytest.approx(a[k]["loco"], rel=1e-12)
        assert b[k]["loco_calibration"] == a[k]["loco_calibration"]
    # ...while the other chips' LOCO fits, which do read the GB200 figures, may move
    assert published.fit(moved, validation.table) != published.fit(figs, validation.table)
