from __future__ import annotations

import json

import numpy as np
import pytest

from moetier.errors import MoetierError
from moetier.traces.importers import catalog_name_for, import_file, open_trace

from .conftest import OLMOE, QWEN, SWITCH, needs_data


@needs_data
@pytest.mark.parametrize("path, kept, dropped, k, experts", [
    (QWEN[0], 4357, 8448, 4, 60), (QWEN[8], 4357, 8448, 4, 60), (QWEN[12], 4357, 8448, 4, 60),
    (OLMOE, 4471, 2048, 8, 64),
])
def test_jsonl_warmup_rows_dropped(path, kept, dropped, k, experts):
    r = import_file(path)
    assert len(r.trace) == kept and r.rows_dropped == dropped and r.rows_read == kept + dropped
    assert r.trace.top_k == k and r.trace.num_experts == experts
    assert r.trace.meta["rows_dropped"] == dropped and r.trace.meta["source_file"] == path.name


@needs_data
def test_qwen_positions_unknown_steps_inferred():
    t = open_trace(QWEN[8])
    assert (t.position == -1).all()
    assert t.step.min() == 0 and t.step.max() > 100  # decode steps of the engine
    assert t.layers == [8] and t.meta["model"] == "Qwen/Qwen1.5-MoE-A2.7B-Chat"


@needs_data
def test_switch_json():
    r = import_file(SWITCH)
    t = r.trace
    assert len(t) == 215 * 6 and r.rows_dropped == 0
    assert t.layers == list(range(6)) and t.top_k == 1 and t.num_experts == 8
    assert np.isnan(t.topk_weights).all()
    raw = json.loads(SWITCH.read_text())
    assert t.topk_ids[t.layer == 3][:5, 0].tolist() == [raw["selections"][i][3][0] for i in range(5)]


def test_catalog_mapping():
    assert catalog_name_for("Qwen/Qwen1.5-MoE-A2.7B-Chat") == "qwen1.5-moe-a2.7b"
    assert catalog_name_for("allenai/OLMoE-1B-7B-0924") == "olmoe-1b-7b"
    assert catalog_name_for("nobody/nothing") is None


def _jsonl(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


def test_synthetic_jsonl_warmup_threshold(tmp_path):
    meta = {"type": "meta", "model_id": "x/y", "top_k": 2, "num_experts": 4, "vllm_version": "0.1"}
    warm = [{"type": "route", "req_id": "a", "token_idx": i, "layer": 0, "topk_ids": [0, 1],
             "topk_weights": [0.5, 0.5]} for i in range(60)]
    real = [{"type": "route", "req_id": "b", "token_idx": i, "layer": 0, "topk_ids": [i % 4, (i + 1) % 4],
             "topk_weights": [0.6 - i * 1e-3, 0.4]} for i in range(10)]
    p = _jsonl(tmp_path, [meta, *warm, *real])
    r = import_file(p)
    assert r.rows_dropped == 60 and len(r.trace) == 10
    assert r.trace.meta["software"] == {"vllm": "0.1"}
    assert r.trace.position.tolist() == list(range(10))
    r2 = import_file(p, warmup_repeats=100)
    assert r2.rows_dropped == 0 and len(r2.trace) == 70


@pytest.mark.parametrize("lines, match", [
    ([{"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, "topk_ids": [0], "topk_weights": [1.0]}],
     "meta"),
    ([{"type": "meta"}, "{oops"], r"t\.jsonl:2"),
    ([{"type": "meta"}, {"type": "route", "req_id": "a", "layer": 0, "topk_ids": [0], "topk_weights": [1]}],
     "token_idx"),
    ([{"type": "meta"}, {"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, "topk_ids": [0, 1],
                         "topk_weights": [1]}], "topk_weights"),
    ([{"type": "meta"}, {"type": "odd"}], "type"),
])
def test_bad_jsonl(tmp_path, lines, match):
    with pytest.raises(MoetierError, match=match):
        import_file(_jsonl(tmp_path, lines))


def test_bad_router_json(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"selections": [[[0]], [[9]]], "expertsPerLayer": 4, "layers": 1, "topK": 1}))
    with pytest.raises(MoetierError, match=r"r\.json.*selections"):
        import_file(p)
    p.write_text(json.dumps({"selections": [], "layers": 1, "topK": 1}))
    with pytest.raises(MoetierError, match="expertsPerLayer"):
        import_file(p)
