from __future__ import annotations

import numpy as np
import pytest

from moetier.traces.format import make_trace
from moetier.traces.simulate import layer_sequences, simulate
from moetier.traces.stats import (
    coverage,
    lru_curve_from_distances,
    previous_token_reuse,
    stack_distances,
    trace_stats,
    zipf_fit,
)

from .conftest import small_trace


def test_zipf_fit_recovers_exponent():
    counts = 1e6 / np.arange(1, 65) ** 1.3
    s, r2 = zipf_fit(counts[::-1])  # order must not matter
    assert s == pytest.approx(1.3, abs=1e-6) and r2 == pytest.approx(1.0)
    s_flat, _ = zipf_fit(np.full(10, 5.0))
    assert s_flat == pytest.approx(0.0, abs=1e-9)


def test_coverage():
    c = np.array([50, 30, 10, 10])
    assert coverage(c, 0.25) == pytest.approx(0.5)
    assert coverage(c, 0.5) == pytest.approx(0.8)
    assert coverage(np.zeros(4), 0.5) == 0.0


def test_stack_distances_by_hand():
    assert stack_distances([1, 2, 1, 3, 2, 2]).tolist() == [-1, -1, 1, -1, 2, 0]


def test_lru_curve_from_distances_equals_simulator(trace):
    for lyr, seq in layer_sequences(trace).items():
        caps = [1, 2, 3, 5, 8]
        curve = lru_curve_from_distances(stack_distances(seq), caps)
        t1 = trace.select(trace.layer == lyr)
        assert curve == pytest.approx([simulate(t1, "lru", c).hit_rate for c in caps])


def test_previous_token_reuse_by_hand():
    t = make_trace(topk_ids=[[0, 1], [1, 2], [3, 4], [3, 5]], layer=[0, 0, 0, 0], request=[0, 0, 1, 1])
    # request 0: {0,1}->{1,2}: 1/2 ; request 1: {3,4}->{3,5}: 1/2 ; cross-request pair ignored
    assert previous_token_reuse(t) == {0: 0.5}


def test_trace_stats_json_ready(trace):
    s = trace_stats(trace)
    assert s["layers"] == [0, 1] and len(s["per_layer"]) == 2
    p = s["per_layer"][0]
    assert sum(p["load"]) == (trace.layer == 0).sum() * trace.top_k
    assert 0 < p["coverage"]["top25%"] < p["coverage"]["top50%"] <= 1
    assert p["zipf"]["exponent"] > 0
    assert sum(p["reuse_distance"]["histogram"]) + p["reuse_distance"]["cold"] == p["reuse_distance"]["accesses"]
    (c,) = s["cross_layer"]
    assert c["from_layer"] == 0 and c["to_layer"] == 1 and 0 <= c["popular_overlap"] <= 1


def test_cross_layer_detects_deterministic_coupling():
    rng = np.random.default_rng(3)
    a = np.stack([rng.choice(8, 2, replace=False) for _ in range(300)])
    b = (a + 3) % 8  # layer 1 experts are a fixed function of layer 0's
    ids = np.empty((600, 2), np.int64)
    ids[0::2], ids[1::2] = a, b
    t = make_trace(topk_ids=ids, layer=np.tile([0, 1], 300))
    (c,) = trace_stats(t)["cross_layer"]
    assert c["predicted_overlap"] == pytest.approx(1.0)
    assert c["popular_overlap"] < 0.6


def test_prefetch_accuracy():
    t = make_trace(topk_ids=[[0, 1], [2, 3], [4, 5]], layer=[1, 1, 1],
                   pred_ids=[[0, 7, -1], [2, 3, 6], [-1, -1, -1]])
    acc = trace_stats(t)["prefetch"]["1"]
    # rows 0-1 have predictions: 3 of 4 selected experts predicted; 3 of 5 predictions used
    assert acc == {"rows": 2, "recall": 0.75, "precision": 0.6}
    assert trace_stats(small_trace())["prefetch"] == {}
