from __future__ import annotations

import numpy as np
import pytest

from moetier.errors import MoetierError
from moetier.traces.importers import open_trace
from moetier.traces.simulate import parse_cache_size, simulate
from moetier.weights.policies import LRU

from .conftest import OLMOE, QWEN, SWITCH, needs_data, small_trace

# /work/shared/data/routing-traces/README.md, "Reference figures"
REFERENCE = [
    (QWEN[0], 15, 0.277, 0.275, 0.584), (QWEN[0], 30, 0.533, 0.545, 0.802),
    (QWEN[8], 15, 0.322, 0.297, 0.611), (QWEN[8], 30, 0.578, 0.557, 0.821),
    (QWEN[12], 15, 0.314, 0.285, 0.607), (QWEN[12], 30, 0.579, 0.553, 0.820),
    (OLMOE, 16, 0.357, 0.432, 0.637), (OLMOE, 32, 0.625, 0.681, 0.840),
]

_cache: dict = {}


def _trace(path):
    if path not in _cache:
        _cache[path] = open_trace(path)
    return _cache[path]


@needs_data
@pytest.mark.parametrize("path, cap, lru, lfu, belady", REFERENCE,
                         ids=[f"{p.name[:6]}-{p.name.split('.')[-2]}-C{c}" for p, c, *_ in REFERENCE])
def test_reproduces_readme_figures(path, cap, lru, lfu, belady):
    t = _trace(path)
    assert round(simulate(t, "lru", cap).hit_rate, 3) == lru
    assert round(simulate(t, "lfu", cap).hit_rate, 3) == lfu
    assert round(simulate(t, "belady", cap).hit_rate, 3) == belady


@needs_data
@pytest.mark.parametrize("path", [QWEN[0], QWEN[8], QWEN[12], OLMOE, SWITCH], ids=lambda p: p.name[:24])
def test_adaptive_at_least_as_good_as_best_of_lru_lfu(path):
    t = _trace(path)
    for frac in (0.25, 0.5):
        cap = int(t.num_experts * frac)
        lru, lfu = simulate(t, "lru", cap).hits, simulate(t, "lfu", cap).hits
        ada = simulate(t, "adaptive", cap).hits
        bel = simulate(t, "belady", cap).hits
        assert max(lru, lfu) <= ada <= bel, (path.name, cap, lru, lfu, ada, bel)


def test_per_layer_and_overall_are_consistent(trace):
    r = simulate(trace, "lru", 3)
    assert [x.layer for x in r.per_layer] == [0, 1]
    assert r.accesses == trace.topk_ids.size
    assert r.hits == sum(x.hits for x in r.per_layer)
    # the per-layer cache is exactly the policy object replayed on that layer's selections
    seq = trace.topk_ids[trace.layer == 1].reshape(-1).tolist()
    p = LRU(3)
    assert r.per_layer[1].hits == sum(p.access(e) for e in seq)


def test_policy_ordering_on_synthetic(trace):
    bel = simulate(trace, "belady", 3).hit_rate
    for name in ("lru", "lfu", "lfu-decay", "adaptive", "static"):
        assert simulate(trace, name, 3).hit_rate <= bel + 1e-12
    assert simulate(trace, "lru", 8).hit_rate == pytest.approx(1 - 8 * 2 / trace.topk_ids.size, abs=0.01)


def test_static_profile_from_other_trace(trace):
    other = small_trace(seed=5)
    r = simulate(trace, "static", 2, profile=other)
    assert 0 < r.hit_rate < 1
    with pytest.raises(MoetierError, match="layer"):
        simulate(trace, "static", 2, profile={0: np.ones(8)})


def test_errors(trace):
    with pytest.raises(MoetierError, match="valid policies"):
        simulate(trace, "mru", 2)
    with pytest.raises(MoetierError, match="cache size"):
        simulate(trace, "lru", -1)
    with pytest.raises(MoetierError, match="layers"):
        simulate(trace, "lru", 2, layers=[7])


def test_parse_cache_size():
    assert parse_cache_size("25%", 60) == 15 and parse_cache_size("16", 64) == 16
    assert parse_cache_size("0.25", 60) == 15 and parse_cache_size("1", 60) == 60  # fractions, as everywhere
    assert parse_cache_size("2GB", 64, lambda: 0.5e9) == 4  # a size: what fits across the MoE layers
    for bad in ("x", "-2", "150%", "2.5", "65", "3.35TB/s"):
        with pytest.raises(MoetierError, match="--cache"):
            parse_cache_size(bad, 60)
    with pytest.raises(MoetierError, match="needs the model's expert bytes"):
        parse_cache_size("2GB", 60)
