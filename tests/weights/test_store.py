"""ExpertStore: per-expert reads into preallocated slots, equal to ExpertReader.read."""

from __future__ import annotations

import os

import pytest
import torch

import moetier
from moetier.errors import WeightError
from moetier.weights.cache import SlotPool
from moetier.weights.store import ALIGN, ExpertStore, SlotLayout
from tests.helpers import make_tiny_checkpoint
from tests.helpers.checkpoints import fuse_experts


def test_slot_layout_is_aligned_and_contiguous():
    lay = SlotLayout(torch.bfloat16, hidden=64, intermediate=40, gate_up_bias=True, down_bias=True)
    assert lay.slot_bytes % ALIGN == 0
    pool = SlotPool(3, lay.slot_bytes)
    w = lay.views(pool.slot(1))
    for t in (w.gate_up, w.down, w.gate_up_bias, w.down_bias):
        assert t.is_contiguous() and t.data_ptr() % ALIGN == 0
    assert w.gate_up.shape == (80, 64) and w.down.shape == (64, 40)
    assert lay.expert_bytes == (3 * 64 * 40 + 80 + 64) * 2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_read_into_equals_reader(tmp_path, fused, io):
    path = make_tiny_checkpoint(tmp_path, "mixtral", max_shard_size=None if fused else "40KB")
    if fused:
        fuse_experts(path)
    m = moetier.load(path)
    store = ExpertStore(m.expert_reader, io=io)
    pool = SlotPool(1, store.layout.slot_bytes)
    for layer in m.spec.moe_layer_ids:
        for e in range(m.spec.num_experts):
            w = store.read_into(layer, e, pool.slot(0))
            r = m.expert_reader.read(layer, e)
            assert torch.equal(w.gate_up, r.gate_up) and torch.equal(w.down, r.down)
            assert store.last_bytes() == r.nbytes
    if not fused:  # per-expert tensors adjacent on disk: one preadv per expert and file
        for layer in m.spec.moe_layer_ids:
            groups = store.pieces(layer, 0)
            assert len(groups) == len({g[0].file for g in groups})
    store.close()


def test_buffered_reads_leave_no_page_cache_residue(tmp_path):
    """posix_fadvise(DONTNEED) after each read: the store's bytes are not kept twice."""
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2, num_experts=8,
                                moe_intermediate_size=256, hidden_size=128)
    m = moetier.load(path)
    store = ExpertStore(m.expert_reader, io="buffered")
    pool = SlotPool(1, store.layout.slot_bytes)
    store.read_into(1, 5, pool.slot(0))
    p = store.pieces(1, 5)[0][0]
    assert p.nbytes > 0
    assert os.path.getsize(p.file) > p.offset + p.nbytes
    store.close()


def test_unknown_expert_and_bad_io_mode(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2)
    m = moetier.load(path)
    with pytest.raises(WeightError, match="io mode"):
        ExpertStore(m.expert_reader, io="mmap")
    store = ExpertStore(m.expert_reader)
    with pytest.raises(WeightError, match="layer 0 expert 99: no such routed expert"):
        store.pieces(0, 99)
