"""Extras: pyproject's optional dependencies match moetier.extras, the core install carries none of them, and
a missing extra is one line naming it (serve, plot) instead of an ImportError traceback."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from moetier import extras
from moetier.cli import main as cli_main
from moetier.errors import MissingExtraError

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras_mirror_pyproject():
    opt = PYPROJECT["optional-dependencies"]
    for extra, dists in extras.EXTRAS.items():
        assert _names(opt[extra]) - {"moetier"} == set(dists), extra
    core = _names(PYPROJECT["dependencies"])
    every_extra = {d for dists in extras.EXTRAS.values() for d in dists}
    assert not core & every_extra  # the core install needs none of them
    assert {"transformers", "openai", "pytest"}.isdisjoint(core)  # test oracles and tools stay out of core
    # dev (scripts/env.sh installs .[dev]) gets every extra
    dev = opt["dev"]
    self_refs = [r for r in dev if r.startswith("moetier[")]
    assert len(self_refs) == 1 and set(self_refs[0][len("moetier["):-1].split(",")) == set(extras.EXTRAS)


def test_missing_serve_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert cli_main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moetier: error: moetier serve needs the 'serve' extra: pip install 'moetier[serve]' "
                   "(missing: fastapi)")


def test_missing_plot_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from moetier.planner import whatif_cluster
    from moetier.traces import plots

    with pytest.raises(MissingExtraError, match=r"needs the 'plot' extra: pip install 'moetier\[plot\]'"):
        plots._plt()
    with pytest.raises(MissingExtraError, match=r"--what-if-plot needs the 'plot' extra"):
        whatif_cluster.plot_shares([], tmp_path / "x.png")


def test_require_passes_when_installed():
    extras.require("serve", "moetier serve")  # the dev install has every extra
    v = extras.versions()
    assert set(v) == set(extras.EXTRAS) and all(x is not None for d in v.values() for x in d.values())
