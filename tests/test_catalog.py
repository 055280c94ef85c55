"""The built-in model catalog: shipped data, metadata, published figures, `moetier models`."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from moetier import catalog
from moetier.catalog import resolve_model
from moetier.cli import main
from moetier.errors import ConfigError
from moetier.planner.census import census, parse_precision
from moetier.spec import ModelSpec

EXPECTED = {
    "deepseek-v3", "deepseek-v2-lite", "kimi-k2", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen1.5-moe-a2.7b",
    "mixtral-8x7b", "mixtral-8x22b", "gpt-oss-120b", "gpt-oss-20b", "olmoe-1b-7b", "llama4-scout",
    "llama4-maverick", "llama-3.3-70b",
}
SHARED = Path("/work/shared/data/model-configs")


def test_names() -> None:
    assert set(catalog.names()) == EXPECTED
    assert catalog.names() == sorted(catalog.names())


def test_entries_ship_as_package_data() -> None:
    root = resources.files("moetier") / "data" / "catalog"
    shipped = {p.name for p in root.iterdir()}
    assert {f"{n}.json" for n in EXPECTED} <= shipped
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"data/**/*"' in pyproject


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry(name: str) -> None:
    spec = catalog.get(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    assert resolve_model(name) == spec
    e = catalog.entry(name)
    assert "/" in e.hf_repo
    parse_precision(e.checkpoint_precision)  # a valid precision string
    pub = catalog.published(name)
    assert pub.convention in catalog.CONVENTIONS and pub.source
    assert 0 < pub.active_params <= pub.total_params
    assert e.config_source["repo"] and e.config_source["commit"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_census_close_to_published(name: str) -> None:
    """Every publisher's headline is a rounded figure within 3 % of our exact count, compared
    in the publisher's own convention (except where the catalog says it matches neither)."""
    pub = catalog.published(name)
    c = census(catalog.get(name))
    assert abs(c.total_params / pub.total_params - 1) < 0.03
    if pub.convention != "unstated":
        assert abs(getattr(c, pub.census_field) / pub.active_params - 1) < 0.03


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="catalog names: deepseek-v2-lite"):
        catalog.get("deepseek-v4")
    with pytest.raises(ConfigError, match="not in the catalog"):
        catalog.published("nope")


def test_configs_match_shared_sources() -> None:
    """Catalog configs are faithful copies of the reference configs they cite."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present on this machine")
    for name in EXPECTED:
        e = catalog.entry(name)
        src = json.loads((SHARED.parent / e.config_source["reference_file"]).read_text())
        assert {k: v for k, v in src.items() if not k.startswith("_")} == dict(e.config), name


def test_models_command(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for n in EXPECTED:
        assert n in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == EXPECTED
    r = next(r for r in rows if r["name"] == "mixtral-8x7b")
    assert r["total_params"] == census(catalog.get("mixtral-8x7b")).total_params
