"""One size rule for every cache / size option (issue 12, items 5-6) and census / plan of a
local checkpoint as stored (item 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetier.catalog import resolve_model
from moetier.cli import main
from moetier.errors import ConfigError, MoetierError
from moetier.planner import roofline
from moetier.planner.census import census
from moetier.planner.machines import parse_quantity, parse_size
from moetier.traces.simulate import parse_cache_size
from moetier.weights.plan import default_plan, parse_bytes
from tests.helpers import make_tiny_checkpoint


@pytest.mark.parametrize("text, want", [
    ("8GB", (8e9, None)), ("512MiB", (512 * 2**20, None)), ("1500000000", (1.5e9, None)),
    ("25%", (None, 0.25)), ("0.25", (None, 0.25)), ("1", (None, 1.0)), ("100%", (None, 1.0)), ("0", (0.0, None)),
])
def test_one_size_rule(text, want):
    s = parse_size(text, "--x")
    assert (s.bytes, s.fraction) == want


@pytest.mark.parametrize("text, msg", [
    ("2", "did you mean '2GB' or a fraction"), ("2.0", "did you mean '2.0GB'"), ("8", "did you mean '8GB'"),
    ("200%", "not a percentage"), ("-1", ">= 0"), ("3.35TB/s", "not a size"), ("989TFLOPS", "not a size"),
    ("abc", "cannot read"),
])
def test_size_rule_refusals_list_sizes(text, msg):
    with pytest.raises(ConfigError, match="--x") as ei:
        parse_size(text, "--x")
    assert msg in str(ei.value)
    assert "TB/s" not in str(ei.value).replace(text, "")  # examples of its own kind only


def test_the_three_cache_options_accept_the_same_forms():
    spec = resolve_model("mixtral-8x7b")
    routed = census(spec, "int4").routed_bytes
    # run --expert-cache (plan), plan --cache (roofline), simulate --cache (experts per layer)
    for form in ("25%", "0.25"):
        p = default_plan(spec, None, None, expert_cache=form)
        assert p.cache_fraction == 0.25 and p.cache_bytes is None
        assert roofline._check_opt_bytes(form, "--cache", True, whole=routed) == pytest.approx(0.25 * routed)
        assert parse_cache_size(form, 8) == 2
    assert default_plan(spec, None, None, expert_cache="8GB").cache_bytes == 8e9
    assert roofline._check_opt_bytes("8GB", "--cache", True, whole=routed) == 8e9
    assert parse_cache_size("8GB", 8, lambda: 32 * census(spec, "int4").expert_bytes) == 8 * 0 + int(
        min(8, 8e9 // (32 * census(spec, "int4").expert_bytes)))
    for opt in (lambda v: default_plan(spec, None, None, expert_cache=v),
                lambda v: roofline.plan(spec, "h100", precision="int4", cache_bytes=v)):
        for bad in ("2", "2.0", "200%"):
            with pytest.raises(MoetierError):
                opt(bad)


def test_plan_cache_fraction_places_that_share(capsys):
    r_all = roofline.plan("mixtral-8x7b", "h100", precision="int4", cache_bytes="100%")
    r_q = roofline.plan("mixtral-8x7b", "h100", precision="int4", cache_bytes="25%")
    assert r_q.to_json() != r_all.to_json()
    assert main(["plan", "mixtral-8x7b", "--machine", "h100", "--precision", "int4", "--cache", "25%",
                 "--what-if", "cache=2x", "--json"]) == 0


def test_max_ram_and_quantity_errors():
    assert parse_bytes("600M", "--max-ram") == 600e6 and parse_bytes("1500000000", "--max-ram") == 1.5e9
    with pytest.raises(ConfigError, match=r"--max-ram: a bare number is bytes.*'600MB'"):
        parse_bytes("600", "--max-ram")
    with pytest.raises(ConfigError, match="not a size"):
        parse_bytes("3.35TB/s", "--max-ram")
    with pytest.raises(ConfigError, match="'8GB', '512MiB'") as ei:
        parse_bytes("lots", "--max-ram")
    assert "989T" not in str(ei.value) and "TB/s" not in str(ei.value)
    with pytest.raises(ConfigError, match="TB/s"):
        parse_quantity("fast", "hbm.read_bw", "bandwidth")


def test_devices_zero_is_refused(capsys):
    assert main(["plan", "mixtral-8x7b", "--machine", "h100", "--devices", "0"]) == 2
    assert "--devices 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# item 10: a local checkpoint is counted as stored


@pytest.mark.parametrize("dtype, prec", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_census_of_a_local_checkpoint_as_stored(tmp_path, capsys, dtype, prec):
    d = make_tiny_checkpoint(tmp_path, "qwen3_moe", tokenizer=False, dtype=dtype)
    stored = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    for extra in ([], ["--precision", "checkpoint"]):
        assert main(["census", str(d), "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["precision"]["name"] == prec if isinstance(out["precision"], dict) else prec in str(out["precision"])
        # the counted bytes are the files' bytes (less their JSON headers)
        assert 0.97 * stored <= out["total_bytes"] <= stored
    assert main(["census", str(d), "--precision", "int4", "--json"]) == 0  # asked for: as asked
    assert json.loads(capsys.readouterr().out)["total_bytes"] < 0.5 * stored
    assert main(["plan", str(d), "--machine", "h100", "--json"]) == 0
    assert prec in json.dumps(json.loads(capsys.readouterr().out)["precision"])


def test_catalog_model_default_stays_bf16(capsys):
    assert main(["census", "mixtral-8x7b", "--json"]) == 0
    assert "bf16" in json.dumps(json.loads(capsys.readouterr().out)["precision"])


def test_census_of_a_config_json_uses_its_torch_dtype(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    embedded = Path(__file__).resolve().parents[1] / "moetier" / "data" / "embedded" / "config.json"
    cfg.write_text(json.dumps({**json.loads(embedded.read_text()), "torch_dtype": "float32"}))
    assert main(["census", str(cfg), "--precision", "checkpoint", "--json"]) == 0  # was refused
    out = json.loads(capsys.readouterr().out)
    assert "fp32" in json.dumps(out["precision"]) and "torch_dtype" in out["precision_source"]


def test_mtp_layers_missing_from_the_files_are_not_counted(tmp_path, capsys):
    """A DeepSeek-V3 saved by transformers has no MTP layer in its files: count what is stored."""
    import tests.helpers.moe_families  # noqa: F401  (registers the deepseek recipes)

    d = make_tiny_checkpoint(tmp_path, "deepseek_v3", tokenizer=False, num_nextn_predict_layers=1)
    assert resolve_model(str(d)).num_mtp_layers == 1  # the config announces one
    assert main(["census", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    stored = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert out["groups"]["mtp"]["params"] == 0
    assert 0.97 * stored <= out["total_bytes"] <= stored
    assert main(["plan", str(d), "--machine", "h100", "--json"]) == 0
