"""Machine catalog, lookup and override files."""

from __future__ import annotations

import json

import pytest

from moetier.cli import main
from moetier.errors import ConfigError, MoetierError
from moetier.planner import machines as mc
from moetier.planner.hardware import Machine

EXPECTED = {"h100", "h800", "h200", "b200", "gb200", "gb300", "mi300x", "mi355x", "trainium2", "trainium3",
            "tpu-v5p", "tpu-v6e", "tpu7x", "ascend-910c", "groq-lpu", "cerebras-wse3"}


def test_catalog_has_every_chip_of_hardware_md():
    assert EXPECTED <= set(mc.CATALOG)
    assert "cpu" in mc.names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalog_entries_are_well_formed(name):
    m = mc.CATALOG[name]
    assert isinstance(m, Machine) and m.name == name
    assert m.confidence in ("R", "U")
    assert "hardware.md" in m.source
    assert m.tiers and all(t.capacity_bytes > 0 and t.read_bw > 0 for t in m.tiers)
    assert m.compute_tier_name in [t.name for t in m.tiers]
    # nearest first: bandwidth never increases going outward
    bws = [t.read_bw for t in m.tiers]
    assert bws == sorted(bws, reverse=True)
    e = m.efficiency
    assert 0 < e.compute <= 1 and 0 < e.memory <= 1 and 0 < e.link <= 1
    assert any("efficiency" in n for n in m.notes), "efficiency assumption must be stated"
    for link in m.links:
        assert m.link(link.src, link.dst) is link


def test_figures_match_hardware_md():
    h100 = mc.CATALOG["h100"]
    assert h100.tier("hbm").capacity_bytes == 80e9
    assert h100.tier("hbm").read_bw == pytest.approx(3.35e12)
    assert h100.flops["bf16"] == pytest.approx(989e12)
    assert h100.flops["fp8"] == pytest.approx(1979e12)
    assert h100.scale_up_bw == pytest.approx(450e9)
    assert mc.CATALOG["trainium2"].tier("hbm").capacity_bytes == 96 * 2**30  # GiB, not GB
    groq = mc.CATALOG["groq-lpu"]
    assert [t.name for t in groq.tiers] == ["sram"]
    assert groq.tier("sram").read_bw == pytest.approx(80e12)
    assert mc.CATALOG["gb300"].flops["fp4"] == pytest.approx(15000e12)


def test_unknown_figures_stay_unknown():
    assert dict(mc.CATALOG["cerebras-wse3"].flops) == {}
    assert mc.CATALOG["mi355x"].scale_up_bw is None
    assert mc.CATALOG["tpu-v5p"].scale_out_bw is None
    with pytest.raises(KeyError):
        mc.CATALOG["cerebras-wse3"].flops_for("bf16")


def test_get_machine_by_name_and_alias():
    assert mc.get_machine("h100") is mc.CATALOG["h100"]
    assert mc.get_machine("H100") is mc.CATALOG["h100"]
    assert mc.get_machine("trn2") is mc.CATALOG["trainium2"]


def test_unknown_machine_lists_known_names():
    with pytest.raises(ConfigError) as e:
        mc.get_machine("h1000")
    msg = str(e.value)
    assert "h1000" in msg and "h100" in msg and "groq-lpu" in msg and "cpu" in msg


def test_parse_quantity_units():
    assert mc.parse_quantity("80GB", "x") == 80e9
    assert mc.parse_quantity("96GiB", "x") == 96 * 2**30
    assert mc.parse_quantity("3.35TB/s", "x") == pytest.approx(3.35e12)
    assert mc.parse_quantity("400Gb/s", "x") == pytest.approx(50e9)  # bits
    assert mc.parse_quantity("989T", "x") == 989e12
    assert mc.parse_quantity(1.5e9, "x") == 1.5e9
    for bad in ("fast", "12 parsecs", True, None, [1]):
        with pytest.raises(ConfigError, match="field.x"):
            mc.parse_quantity(bad, "field.x")


def test_fmt_si():
    assert mc.fmt_si(3.35e12, "B/s") == "3.35 TB/s"
    assert mc.fmt_bytes(80e9) == "80 GB"
    assert mc.fmt_seconds(0.0021) == "2.1 ms"
    assert mc.fmt_si(None) == "-"
    assert mc.fmt_seconds(1370.0) == "1370 s" and mc.fmt_seconds(3.21) == "3.21 s"
    assert mc.fmt_tokens_per_s(0.311) == "0.311 tok/s" and mc.fmt_tokens_per_s(1830) == "1.83 ktok/s"


FULL_TOML = """
name = "lab-gpu"
confidence = "U"
source = "my lab"
compute_tier = "hbm"
[flops]
bf16 = "100T"
[efficiency]
compute = 0.5
[[tiers]]
name = "hbm"
capacity = "24GB"
read_bw = "1TB/s"
[[tiers]]
name = "dram"
capacity = "256GB"
read_bw = "100GB/s"
compute_flops = "2T"
[[links]]
name = "pcie"
src = "dram"
dst = "hbm"
bw = "32GB/s"
"""


def test_full_toml_override(tmp_path):
    p = tmp_path / "lab.toml"
    p.write_text(FULL_TOML)
    m = mc.get_machine(str(p))
    assert m.name == "lab-gpu"
    assert [t.name for t in m.tiers] == ["hbm", "dram"]
    assert m.tier("hbm").capacity_bytes == 24e9
    assert m.tier("dram").compute_flops == 2e12
    assert m.flops["bf16"] == 100e12
    assert m.efficiency.compute == 0.5 and m.efficiency.memory == 0.8
    assert m.link("hbm", "dram").bw == 32e9


def test_yaml_patch_of_builtin(tmp_path):
    p = tmp_path / "h100x.yaml"
    p.write_text("base: h100\ntiers:\n  hbm:\n    capacity: 40GB\n  ssd:\n    capacity: 4TB\n    read_bw: 7GB/s\n")
    m = mc.get_machine(p)
    h = mc.CATALOG["h100"]
    assert m.tier("hbm").capacity_bytes == 40e9
    assert m.tier("hbm").read_bw == h.tier("hbm").read_bw  # untouched
    assert [t.name for t in m.tiers] == ["hbm", "dram", "ssd"]
    assert m.flops == h.flops and m.scale_up_bw == h.scale_up_bw
    assert "h100" in m.source


@pytest.mark.parametrize("text, key", [
    ('name = "x"\nbogus = 1\n[[tiers]]\nname="hbm"\ncapacity=1\nread_bw=1\n', "bogus"),
    ('name = "x"\n[[tiers]]\nname="hbm"\ncapacity="lots"\nread_bw=1\n', "tiers[0].capacity"),
    ('name = "x"\n[[tiers]]\nname="hbm"\ncapacity=-5\nread_bw=1\n', "tiers[0].capacity"),
    ('name = "x"\n[[tiers]]\nname="hbm"\ncapacity=1e9\n', "tiers[0].read_bw"),
    ('name = "x"\n[[tiers]]\nname="hbm"\ncapacity=1e9\nread_bw=1\nspeed=3\n', "speed"),
    ('name = "x"\n', "tiers"),
    ('base = "h9000"\n', "base"),
    ('base = "h100"\n[efficiency]\nmemory = 1.5\n', "efficiency.memory"),
    ('base = "h100"\ncompute_tier = "l3"\n', "compute_tier"),
    ('base = "h100"\n[flops]\nbf16 = 0\n', "flops.bf16"),
    ('name = [\n', "cannot parse"),
])
def test_malformed_override_names_the_key(tmp_path, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        mc.get_machine(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_missing_override_file(tmp_path):
    with pytest.raises(MoetierError, match="no such machine file"):
        mc.get_machine(tmp_path / "nope.toml")


def test_machines_cli_lists_and_describes(capsys, tmp_path):
    assert main(["machines"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    assert main(["machines", "h200", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tiers"][0]["capacity_bytes"] == 141e9 and d["efficiency"]["memory"] == 0.8
    assert main(["machines", "nonesuch"]) == 2
    assert "known machines" in capsys.readouterr().err
