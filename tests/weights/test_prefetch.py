"""Prefetch: next-layer router guesses, bounded in-flight reads, precision/recall, priorities."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import moetier
from moetier.weights import tiered
from moetier.weights.metrics import HierarchyMetrics
from moetier.weights.plan import PlacementPlan
from moetier.weights.prefetch import IOWorker, ReadJob
from tests.helpers import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pf"), "qwen3_moe", num_hidden_layers=3, num_experts=8)


def provider(path, slots=0, prefetch_slots=2):
    m = moetier.load(path)
    plan = PlacementPlan(policy="lru", prefetch=True)
    return m, tiered.TieredExpertProvider(m.spec, m.expert_reader, plan, cache_slots=slots,
                                          prefetch_slots=prefetch_slots)


def test_guess_accounting_and_handover(ckpt):
    m, p = provider(ckpt, slots=4, prefetch_slots=2)
    try:
        p.prefetch(1, [1, 2, 5, 6])  # only 2 reads start: bounded in-flight
        assert len(p.prefetched) == 2 and p.n_prefetch_used == 2
        for j in p.prefetched.values():
            assert j.done.wait(10)
        p.require(1, [2, 3])
        mt = p.metrics
        assert (mt.pf_guesses, mt.pf_correct, mt.pf_actual) == (4, 1, 2)
        assert mt.prefetch_precision == 0.25 and mt.prefetch_recall == 0.5
        assert mt.prefetch_served == 1  # expert 2 came from the prefetch slot
        for e in (2, 3):
            w = p.get(1, e)
            r = m.provider.get(1, e)
            assert torch.equal(w.gate_up, r.gate_up) and torch.equal(w.down, r.down)
        p.finish_layer()
        for j in list(p.zombies):
            j.done.wait()
        p._reap()
        assert p.n_prefetch_used == 0 and mt.bytes_prefetch_wasted > 0  # expert 1 was read for nothing
        # cached experts are not prefetched again
        p.prefetch(1, [2, 3])
        assert not p.prefetched
    finally:
        p.close()


def test_model_prefetch_overlaps_and_reports(ckpt):
    ref = moetier.load(ckpt)
    ids0 = ref.generate_ids(list(range(3, 30)), 12).ids
    m = tiered.load(ckpt, policy="lru", cache_slots=4, prefetch=True)
    try:
        assert m.generate_ids(list(range(3, 30)), 12).ids == ids0
        s = m.hierarchy_metrics.summary()
        assert 0 < s["prefetch_precision"] <= 1 and 0 < s["prefetch_recall"] <= 1
        assert s["prefetch_served_misses"] > 0 and s["store_bytes_prefetch"] > 0
        assert s["bytes_per_token"]["store"] > 0 and s["bytes_per_token"]["resident"] > 0
    finally:
        m.hierarchy.close()


def test_demand_reads_go_before_guesses(ckpt):
    m = moetier.load(ckpt)
    gate, entered = threading.Event(), threading.Event()
    order: list[tuple[int, int]] = []

    class SlowStore:
        def read_into(self, layer, e, buf):
            entered.set()
            gate.wait()
            order.append((layer, e))

        def last_bytes(self):
            return 0

    w = IOWorker(SlowStore(), lambda i: None, HierarchyMetrics())
    try:
        first = w.submit(ReadJob(0, 0, 0, prefetch=True))  # occupies the worker
        assert entered.wait(10)
        jobs = [w.submit(ReadJob(1, e, 0, prefetch=True)) for e in (1, 2)]
        jobs.append(w.submit(ReadJob(2, 7, 0, prefetch=False)))
        gate.set()
        for j in [first, *jobs]:
            assert j.done.wait(10)
        assert order == [(0, 0), (2, 7), (1, 1), (1, 2)]
    finally:
        w.close()
    del m


def test_process_exits_cleanly_with_a_read_in_flight(tmp_path):
    """CI saw `moetier run --max-ram 1G ...` abort at exit (-6, "terminate called without an
    active exception"): a daemon reading thread inside a torch call when the interpreter
    finalized. The script below exits while a read that spends its time in torch is running;
    without the atexit drain in moetier.weights.prefetch it aborts every time."""
    script = tmp_path / "exit_mid_read.py"
    script.write_text(textwrap.dedent("""
        import time, torch
        from moetier.weights.metrics import HierarchyMetrics
        from moetier.weights.prefetch import IOWorker, ReadJob

        class SlowStore:
            def read_into(self, layer, expert, buf):
                a = torch.randn(600, 600)
                for _ in range(60):
                    a = torch.mm(a, a).clamp_(-1, 1)  # torch releases the GIL in here
            def last_bytes(self):
                return 0

        w = IOWorker(SlowStore(), lambda i: None, HierarchyMetrics())
        w.submit(ReadJob(0, 0, 0, prefetch=True))
        w.submit(ReadJob(0, 1, 1, prefetch=True))  # queued: dropped at exit, not read
        time.sleep(0.05)
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-500:]}"
