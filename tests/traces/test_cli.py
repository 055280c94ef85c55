from __future__ import annotations

import json

import pytest

from moetier.cli import main
from moetier.traces.format import load_trace, save_trace

from .conftest import OLMOE, needs_data


def test_simulate_json(tmp_path, trace, capsys):
    p = save_trace(trace, tmp_path / "t.npz")
    assert main(["simulate", str(p), "--policy", "lru", "--cache", "25%", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capacity"] == 2 and out["policy"] == "lru"
    assert 0 < out["hit_rate"] < 1 and [x["layer"] for x in out["per_layer"]] == [0, 1]


def test_simulate_table_all_policies(tmp_path, trace, capsys):
    p = save_trace(trace, tmp_path / "t.npz")
    assert main(["simulate", str(p), "--policy", "all", "--cache", "3"]) == 0
    out = capsys.readouterr().out
    assert "belady" in out and "overall" in out


def test_simulate_errors_exit_2(tmp_path, trace, capsys):
    p = save_trace(trace, tmp_path / "t.npz")
    assert main(["simulate", str(p), "--policy", "nope", "--cache", "3"]) == 2
    assert "valid policies" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.npz"), "--cache", "3"]) == 2
    assert main(["simulate", str(p), "--cache", "3", "--param", "half_life"]) == 2
    assert main(["simulate", str(p), "--cache", "3", "--policy", "lru,lfu", "--param", "half_life=2"]) == 2
    assert main(["simulate", str(p), "--cache", "3", "--param", "bogus=2"]) == 2
    capsys.readouterr()
    assert main(["simulate", str(p), "--cache", "3", "--param", "half_life=1e9", "--param", "admission=0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == {"half_life": 1e9, "admission": 0}
    assert main(["simulate", str(p), "--cache", "3", "--machine", "x"]) == 2  # model not in catalog


@needs_data
def test_simulate_raw_file_and_import(tmp_path, capsys):
    assert main(["simulate", str(OLMOE), "--policy", "lfu", "--cache", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["hit_rate"], 3) == 0.432 and out["rows_dropped"] == 2048
    dst = tmp_path / "ol.npz"
    assert main(["trace", "import", str(OLMOE), "--out", str(dst)]) == 0
    assert "2048 warm-up rows dropped" in capsys.readouterr().out
    assert len(load_trace(dst)) == 4471


def test_trace_stats_json_and_plots(tmp_path, trace, capsys):
    p = save_trace(trace, tmp_path / "t.npz")
    assert main(["trace", "stats", str(p), "--json", "--plot", str(tmp_path / "plots")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == len(trace) and len(s["plots"]) == 2
    for f in s["plots"]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["trace", "stats", str(p)]) == 0
    assert "zipf" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["trace", "import"], "exactly one FILE"),
    (["trace", "import", "x.jsonl"], "--out"),
    (["trace", "stats"], "exactly one TRACE"),
    (["trace"], "--prompts"),
    (["trace", "a", "b"], "unexpected"),
])
def test_trace_usage_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


@needs_data
def test_simulate_machine_prediction(capsys):
    pytest.importorskip("moetier.planner.roofline")
    from .conftest import QWEN

    assert main(["simulate", str(QWEN[8]), "--policy", "lru,belady", "--cache", "25%", "--machine", "h100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lru, bel = out["results"]
    assert lru["prediction"]["model"] == "qwen1.5-moe-a2.7b"
    assert lru["prediction"]["cache_bytes"] == bel["prediction"]["cache_bytes"] > 0
    assert bel["prediction"]["tokens_per_s"] > lru["prediction"]["tokens_per_s"] > 0
    assert main(["simulate", str(QWEN[8]), "--cache", "4", "--machine", "h100", "--model", "olmoe-1b-7b"]) == 2
    assert "60" in capsys.readouterr().err
