from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from moetier.errors import MoetierError
from moetier.weights.policies import (
    LFU,
    LRU,
    Adaptive,
    Belady,
    CachePolicy,
    get_policy,
    next_use_indices,
    policy_names,
)


def hits(policy: CachePolicy, seq) -> int:
    return sum(policy.access(k) for k in seq)


def test_registry_names_and_unknown_name_lists_valid():
    assert policy_names() == ["lru", "lfu", "lfu-decay", "static", "adaptive", "belady"]
    with pytest.raises(MoetierError) as e:
        get_policy("clock", 4)
    for n in policy_names():
        assert n in str(e.value)


@pytest.mark.parametrize("bad", [-1, 1.5, "4", True])
def test_bad_capacity(bad):
    with pytest.raises(MoetierError, match="capacity"):
        get_policy("lru", bad)


def test_bad_params_name_the_parameter():
    with pytest.raises(MoetierError, match="half_life"):
        get_policy("adaptive", 4, half_life=0)
    with pytest.raises(MoetierError, match="period"):
        get_policy("lfu-decay", 4, period=0)
    with pytest.raises(MoetierError, match="bad parameters"):
        get_policy("lru", 4, nonsense=1)
    with pytest.raises(MoetierError, match="future"):
        get_policy("belady", 4)
    with pytest.raises(MoetierError, match="profile"):
        get_policy("static", 4)


def test_lru_order_and_flags():
    p = LRU(2)
    assert p.access(1) is False and p.admitted and p.evicted is None
    assert p.access(2) is False
    assert p.access(1) is True  # 1 becomes most recent
    assert p.access(3) is False and p.evicted == 2  # 2 was least recent
    assert p.resident() == {1, 3}


def test_lfu_counts_persist_after_eviction():
    p = LFU(1)
    for k in [1, 1, 2]:
        p.access(k)
    # 2 missed; 1 (count 2) was the only resident -> evicted anyway
    assert p.resident() == {2}
    assert p.counts == {1: 2, 2: 1}
    p.access(1)  # count 3, evicts 2
    p.access(2)  # count 2: 1 (3) is evicted because it is the only candidate
    assert p.counts[1] == 3 and p.counts[2] == 2


def test_lfu_evicts_least_frequent():
    p = LFU(2)
    for k in [1, 1, 1, 2, 3]:
        p.access(k)
    assert p.resident() == {1, 3}
    assert p.evicted == 2


def test_exclude_protects_and_bypasses_when_all_excluded():
    p = LRU(2)
    p.access(1)
    p.access(2)
    assert p.access(3, exclude={1}) is False and p.evicted == 2
    assert p.resident() == {1, 3}
    assert p.access(4, exclude={1, 3}) is False
    assert not p.admitted and p.evicted is None and p.resident() == {1, 3}


def test_capacity_zero_never_caches():
    p = get_policy("adaptive", 0)
    assert hits(p, [1, 1, 1]) == 0 and len(p) == 0 and not p.admitted


def test_static_pins_hottest_and_admits_nothing():
    p = get_policy("static", 2, profile=np.array([5, 0, 9, 1]))
    assert p.resident() == {0, 2}
    assert p.access(2) is True and p.access(3) is False and not p.admitted
    assert p.resident() == {0, 2}
    g = get_policy("static", 1, profile=np.array([[1, 2], [7, 0]]))
    assert g.resident() == {(1, 0)}


def test_adaptive_moves_between_lru_and_lfu():
    # long half-life behaves like LFU, short like LRU on a trace where they differ
    rng = random.Random(0)
    seq = [rng.choice([0, 0, 0, 1, 2, 3, 4, 5]) for _ in range(2000)]
    lfu, lru = hits(LFU(2), seq), hits(LRU(2), seq)
    assert lfu != lru
    assert hits(Adaptive(2, half_life=1e9, admission=False), seq) == pytest.approx(lfu, abs=5)
    assert hits(Adaptive(2, half_life=0.01, admission=False), seq) == lru
    assert hits(Adaptive(2, half_life=0.01), seq) == lru  # admission never refuses the newest key


def test_adaptive_rescales_without_overflow():
    p = Adaptive(2, half_life=1.0)
    for i in range(5000):
        p.access(i % 3)
    assert all(np.isfinite(v) for v in p.scores.values())
    assert 0 < p.score(2) <= 2.0


def test_next_use_indices_numpy_and_python_paths_agree():
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 6, size=200)
    a = next_use_indices(seq)
    b = next_use_indices([(0, int(x)) for x in seq])  # hashable non-int keys: python path
    assert a.tolist() == b.tolist()
    assert a[0] > 0 and (a[seq == seq[-1]][-1] >= len(seq))


def _optimal_hits(seq, cap):
    """Brute force: best hits over all eviction choices (tiny inputs)."""
    best = 0

    def rec(i, cache, h):
        nonlocal best
        if i == len(seq):
            best = max(best, h)
            return
        k = seq[i]
        if k in cache:
            rec(i + 1, cache, h + 1)
        elif len(cache) < cap:
            rec(i + 1, cache | {k}, h)
        else:
            for v in cache:
                rec(i + 1, (cache - {v}) | {k}, h)

    rec(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_and_beats_every_policy(seed):
    rng = random.Random(seed)
    seq = [rng.randrange(5) for _ in range(11)]
    cap = 2
    bel = hits(Belady(cap, future=seq), seq)
    assert bel == _optimal_hits(seq, cap)
    for name in ("lru", "lfu", "lfu-decay", "adaptive"):
        assert hits(get_policy(name, cap), seq) <= bel


def test_belady_checks_the_future():
    p = Belady(2, future=[1, 2])
    p.access(1)
    with pytest.raises(MoetierError, match="future"):
        p.access(3)


def test_global_cache_keys_are_tuples():
    p = get_policy("lru", 2)
    seq = [(0, 1), (1, 1), (0, 1), (2, 5)]
    assert [p.access(k) for k in seq] == [False, False, True, False]
    assert p.resident() == {(0, 1), (2, 5)}


def test_policies_are_independent_objects():
    a, b = get_policy("lfu", 2), get_policy("lfu", 2)
    for k in itertools.chain(range(5), range(5)):
        a.access(k)
    assert len(b) == 0 and b.counts == {}


def test_adaptive_admission_bypasses_cold_keys():
    p = Adaptive(1, half_life=1e6)
    for _ in range(3):
        p.access(7)
    assert p.access(8) is False and not p.admitted and p.evicted is None
    assert p.resident() == {7}
    p.access(8)  # 2 accesses < 3
    assert p.resident() == {7}
    p.access(8)  # 3 accesses, more recent than 7's 3 -> higher decayed score
    assert p.resident() == {8} and p.evicted == 7
    q = Adaptive(1, half_life=1e6, admission=False)
    q.access(7)
    q.access(7)
    q.access(8)
    assert q.resident() == {8}
