"""Local ranks get disjoint CPU slices (moetier.distributed.executor.cpu_slice / pin_local_rank)."""

import os

import pytest

from moetier.distributed.executor import cpu_slice, pin_local_rank


@pytest.mark.parametrize("cpus,world", [([0, 1], 2), ([0, 1, 2, 3], 2), ([4, 9, 2, 7, 5], 2), (list(range(8)), 3)])
def test_slices_are_disjoint_equal_and_inside_the_set(cpus, world):
    got = [cpu_slice(cpus, r, world) for r in range(world)]
    flat = [c for g in got for c in g]
    assert len(flat) == len(set(flat)) and set(flat) <= set(cpus)
    assert {len(g) for g in got} == {len(cpus) // world}


def test_fewer_cpus_than_ranks_or_one_rank_pins_nobody():
    assert cpu_slice([0, 1], 0, 4) is None
    assert cpu_slice([0, 1, 2], 0, 1) is None
    assert cpu_slice([0, 1], 2, 2) is None  # not a local rank of this world


def test_pin_is_off_when_asked_or_outside_a_job(monkeypatch):
    before = os.sched_getaffinity(0)
    monkeypatch.setenv("MOETIER_EP_PIN", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pin_local_rank() is None
    monkeypatch.delenv("MOETIER_EP_PIN")
    monkeypatch.delenv("LOCAL_RANK")
    assert pin_local_rank() is None
    assert os.sched_getaffinity(0) == before
