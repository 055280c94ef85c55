"""SlotPool and ExpertCache: slot accounting around the shared policy objects."""

from __future__ import annotations

import pytest

from moetier.errors import ConfigError
from moetier.weights.cache import ExpertCache, SlotPool
from moetier.weights.policies import PolicyError


def run(cache, pool, layer, experts):
    out = []
    for e in experts:
        a = cache.access(layer, e, experts, pool.acquire, pool.release)
        if a.slot is not None and a.needs_read:
            cache.mark_valid((layer, e))
        out.append(a)
    return out


def test_pool_preallocated_aligned():
    pool = SlotPool(4, 8192)
    assert pool.buffer.data_ptr() % 4096 == 0 and pool.nbytes == 4 * 8192
    got = [pool.acquire() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3] and pool.acquire() is None
    pool.release(2)
    assert pool.acquire() == 2
    with pytest.raises(ValueError):
        SlotPool(1, 1000)
    with pytest.raises(ConfigError, match="device"):
        SlotPool(1, 4096, device="cuda")


def test_global_lru_evicts_and_frees_slots():
    pool = SlotPool(2, 4096)
    c = ExpertCache([0, 1], capacity=2, policy="lru")
    a = run(c, pool, 0, [1, 2])
    assert [x.hit for x in a] == [False, False] and pool.free == 0
    a = run(c, pool, 1, [5])  # evicts (0, 1), the least recently used
    assert a[0].evicted == (0, 1) and (0, 1) not in c.slot_of and pool.free == 0
    a = run(c, pool, 0, [2])
    assert a[0].hit


def test_step_experts_are_never_evicted_for_each_other():
    pool = SlotPool(2, 4096)
    c = ExpertCache([0], capacity=2, policy="lru")
    run(c, pool, 0, [1, 2])
    a = run(c, pool, 0, [3, 1, 2])  # cache full of experts this step needs: 3 is bypassed
    assert a[0].slot is None and a[0].evicted is None
    assert a[1].hit and a[2].hit


def test_failed_read_is_not_served():
    pool = SlotPool(1, 4096)
    c = ExpertCache([0], capacity=1, policy="lru")
    a = c.access(0, 4, [4], pool.acquire, pool.release)
    assert a.needs_read and not a.hit  # read fails: never marked valid
    a = c.access(0, 4, [4], pool.acquire, pool.release)
    assert not a.hit and a.needs_read and a.slot is not None  # read again into the same slot
    assert pool.free == 0


def test_per_layer_scope_and_static_profile():
    pool = SlotPool(4, 4096)
    c = ExpertCache([1, 3], capacity=5, policy="static", scope="per_layer",
                    profile=[[0, 9, 8, 0], [7, 0, 0, 6]])
    assert c.capacity == 4  # 2 per layer
    assert sorted(c.resident_keys()) == [(1, 1), (1, 2), (3, 0), (3, 3)]
    a = run(c, pool, 1, [0])
    assert a[0].slot is None  # static admits nothing else
    with pytest.raises(PolicyError, match="profile"):
        ExpertCache([0], capacity=2, policy="static")
    with pytest.raises(ConfigError, match="scope"):
        ExpertCache([0], capacity=2, scope="everywhere")
