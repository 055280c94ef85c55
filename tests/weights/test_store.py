"""ExpertStore: per-expert reads into preallocated slots, equal to ExpertReader.read."""

from __future__ import annotations

import errno
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import moetier
from moetier.errors import WeightError
from moetier.weights import store as store_mod
from moetier.weights.cache import SlotPool
from moetier.weights.store import ALIGN, ExpertStore, SlotLayout, read_aligned
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


def test_bad_io_depth(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2)
    m = moetier.load(path)
    with pytest.raises(WeightError, match="io_depth 0"):
        ExpertStore(m.expert_reader, io_depth=0)


def _data_file(tmp_path, nbytes):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    f = tmp_path / "data.bin"
    f.write_bytes(data.numpy().tobytes())
    return f, data


@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_read_aligned_chunks_cover_the_range_once(tmp_path, depth, monkeypatch):
    monkeypatch.setattr(store_mod, "MIN_CHUNK", ALIGN)
    f, data = _data_file(tmp_path, 40 * ALIGN)
    fd = os.open(f, os.O_RDONLY)
    pool = ThreadPoolExecutor(max(1, depth - 1))
    try:
        buf = mmap.mmap(-1, 64 * ALIGN)
        seen = []
        got = read_aligned(fd, memoryview(buf), 3 * ALIGN, 31 * ALIGN, pool, depth,
                           lambda lo, hi: seen.append((lo, hi)))
        assert got == 31 * ALIGN
        out = torch.frombuffer(buf, dtype=torch.uint8)
        assert torch.equal(out[: 31 * ALIGN], data[3 * ALIGN : 34 * ALIGN])
        seen.sort()  # disjoint chunks covering [0, 31 * ALIGN) exactly, each reported once
        assert seen[0][0] == 0 and seen[-1][1] == 31 * ALIGN
        assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))
        assert len(seen) == min(depth, 31)
        # past the end of the file: the contiguous prefix that exists
        assert read_aligned(fd, memoryview(buf), 30 * ALIGN, 20 * ALIGN, pool, depth) == 10 * ALIGN
        del out
        buf.close()
    finally:
        os.close(fd)
        pool.shutdown()


def test_read_aligned_waits_for_every_chunk_before_raising(tmp_path, monkeypatch):
    """An error in one chunk is raised only after every other chunk has returned (nothing writes
    into the buffer after the call)."""
    monkeypatch.setattr(store_mod, "MIN_CHUNK", ALIGN)
    f, _ = _data_file(tmp_path, 16 * ALIGN)
    real = os.preadv
    finished = []

    def preadv(fd, bufs, offset, *a):
        if offset == 4 * ALIGN:
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(0.05)
        n = real(fd, bufs, offset, *a)
        finished.append(offset)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    fd = os.open(f, os.O_RDONLY)
    pool = ThreadPoolExecutor(3)
    try:
        buf = mmap.mmap(-1, 16 * ALIGN)
        with pytest.raises(OSError, match="Input/output"):
            read_aligned(fd, memoryview(buf), 0, 16 * ALIGN, pool, 4)
        assert sorted(finished) == [0, 8 * ALIGN, 12 * ALIGN]
    finally:
        os.close(fd)
        pool.shutdown()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("depth", [1, 4])
def test_split_direct_reads_equal_reader(tmp_path, fused, depth, monkeypatch):
    """Experts read as several aligned chunks in flight (chunks shrunk to one block so tiny experts
    split) are bit-identical to the reader's."""
    monkeypatch.setattr(store_mod, "MIN_CHUNK", ALIGN)
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2, num_experts=4,
                                moe_intermediate_size=96, hidden_size=128)
    if fused:
        fuse_experts(path)
    m = moetier.load(path)
    store = ExpertStore(m.expert_reader, io="direct", io_depth=depth)
    pool = SlotPool(1, store.layout.slot_bytes)
    for layer in m.spec.moe_layer_ids:
        for e in range(m.spec.num_experts):
            w = store.read_into(layer, e, pool.slot(0))
            r = m.expert_reader.read(layer, e)
            assert torch.equal(w.gate_up, r.gate_up) and torch.equal(w.down, r.down)
    store.close()
