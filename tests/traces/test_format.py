from __future__ import annotations

import json

import numpy as np
import pytest

from moetier.errors import MoetierError
from moetier.traces.format import load_trace, make_trace, save_trace

from .conftest import small_trace


def test_round_trip(tmp_path, trace):
    p = save_trace(trace, tmp_path / "t")
    assert p.name == "t.npz"
    t2 = load_trace(p)
    for name in ("request", "position", "phase", "layer", "step", "topk_ids", "topk_weights"):
        assert np.array_equal(getattr(t2, name), getattr(trace, name)), name
    assert t2.meta["model"] == "synthetic" and t2.meta["format"] == "moetier-trace"
    assert t2.top_k == 2 and t2.num_experts == 8 and t2.layers == [0, 1]


def test_pred_ids_round_trip(tmp_path):
    t = make_trace(topk_ids=[[0, 1], [2, 3]], layer=[0, 1], pred_ids=[[-1, -1], [2, 5]])
    t2 = load_trace(save_trace(t, tmp_path / "p.npz"))
    assert t2.pred_ids.tolist() == [[-1, -1], [2, 5]]


def _write(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


def test_missing_field_names_file_and_field(tmp_path):
    p = _write(tmp_path, topk_ids=np.zeros((2, 2), np.int32), meta=np.array("{}"))
    with pytest.raises(MoetierError, match=r"bad\.npz.*'layer'"):
        load_trace(p)


def test_not_an_npz(tmp_path):
    p = tmp_path / "x.npz"
    p.write_text("hello")
    with pytest.raises(MoetierError, match="x.npz"):
        load_trace(p)
    with pytest.raises(MoetierError, match="no such"):
        load_trace(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(topk_ids=np.array([[1, 1], [0, 2]], np.int32)), "topk_ids"),
        (lambda d: d.update(topk_ids=np.array([[-3, 1], [0, 2]], np.int32)), "topk_ids"),
        (lambda d: d.update(phase=np.array([0, 7], np.int8)), "phase"),
        (lambda d: d.update(layer=np.array([0], np.int32)), "layer"),
        (lambda d: d.update(topk_weights=np.zeros((2, 3), np.float32)), "topk_weights"),
        (lambda d: d.update(meta=np.array(json.dumps({"format": "moetier-trace", "version": 9}))), "version"),
        (lambda d: d.update(meta=np.array(json.dumps({"num_experts": 2}))), "num_experts"),
        (lambda d: d.update(meta=np.array("{not json")), "meta"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutate, field):
    d = {"topk_ids": np.array([[0, 1], [0, 2]], np.int32), "layer": np.array([0, 0], np.int32),
         "phase": np.array([0, 1], np.int8), "topk_weights": np.ones((2, 2), np.float32),
         "meta": np.array(json.dumps({"format": "moetier-trace", "version": 1}))}
    mutate(d)
    with pytest.raises(MoetierError, match=field) as e:
        load_trace(_write(tmp_path, **d))
    assert "bad.npz" in str(e.value)


def test_select_keeps_columns():
    t = small_trace(rows=10)
    s = t.select(t.layer == 1)
    assert len(s) == 10 and set(s.layer.tolist()) == {1}
