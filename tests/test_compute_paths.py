"""Which compute path (native / torch) each kind of step takes, and why: Model, run --json, /metrics."""

from __future__ import annotations

import json

import httpx
import pytest

import moetier
from moetier.cli import main
from moetier.serve.app import BackgroundServer, build_app
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.serve.test_server import parse_prometheus

PROMPT = "hello there, a prompt of several tokens"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("paths"), "qwen3_moe", seed=1)


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("MOETIER_NATIVE", raising=False)


def test_model_counts_steps_by_kind_and_path(tiny):
    m = moetier.load(tiny, tokenizer=False)
    native = m.native_reason is None  # no C compiler: everything is torch, with the reason
    assert all(p["steps"] == 0 for p in m.compute_paths().values())
    a, b = m.new_sequence(), m.new_sequence()
    m.step([(a, [1, 2, 3])])  # prefill
    m.step([(a, [4])])  # decode
    m.step([(a, [5])])
    m.step([(a, [6]), (b, [7, 8])])  # batch
    p = m.compute_paths()
    assert {k: v["steps"] for k, v in p.items()} == {"decode": 2, "prefill": 1, "batch": 1}
    assert p["decode"]["path"] == ("native" if native else "torch")
    assert (p["decode"]["reason"] is None) == native
    for kind in ("prefill", "batch"):  # the generic families' multi-token steps are native too
        assert p[kind]["path"] == ("native" if native else "torch")
        assert (p[kind]["reason"] is None) == native
    t = moetier.load(tiny, tokenizer=False, native=False)
    assert all(v["path"] == "torch" and "native=False" in v["reason"] for v in t.compute_paths().values())


def test_run_json_reports_paths_and_threads(tiny, capsys):
    assert main(["run", str(tiny), "--prompt", PROMPT, "--max-tokens", "3", "--json", "--no-native"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["decode_path"] == "torch" and rep["prefill_path"] == "torch"
    assert "native=False" in rep["prefill_path_reason"]
    assert rep["compute_paths"]["prefill"]["steps"] == 1
    assert rep["compute_paths"]["decode"]["steps"] >= 1  # the warm-up and the generation's steps
    assert rep["threads"]["mode"] in ("auto", "fixed (torch.set_num_threads)")
    assert main(["run", str(tiny), "--prompt", PROMPT, "--max-tokens", "3", "--json", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["threads"] == {"mode": "fixed", "threads": 1}
    native = moetier.load(tiny, tokenizer=False).native_reason is None
    assert rep["prefill_path"] == ("native" if native else "torch")
    assert (rep["prefill_path_reason"] is None) == native


def test_metrics_report_paths(tiny):
    model = moetier.load(tiny)
    app = build_app(model, model_name="m", max_batch=4)
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200
        got = parse_prometheus(httpx.get(srv.base_url + "/metrics", timeout=10).text)
    rows = {k: v for k, v in got.items() if k.startswith("moetier_compute_steps_total{")}
    assert len(rows) == 3
    path = "native" if model.native_reason is None else "torch"
    prefill = [v for k, v in rows.items() if 'kind="prefill"' in k and f'path="{path}"' in k]
    assert prefill and prefill[0] >= 1
    decode = [v for k, v in rows.items() if 'kind="decode"' in k and f'path="{path}"' in k]
    assert decode and decode[0] >= 1
