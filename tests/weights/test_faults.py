"""Store faults: a shard truncated mid-run or an I/O error raises WeightError naming the
layer, expert, tensor and file, and the cache never serves a half-read expert."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

import moetier
from moetier.errors import WeightError
from moetier.weights import store, tiered
from tests.helpers import make_tiny_checkpoint

PROMPT = list(range(5, 30))


@pytest.fixture()
def ckpt(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2, num_experts=8)
    ref = moetier.load(path)
    return path, ref.logits(PROMPT)


@pytest.fixture(params=["whole", "split"])
def chunks(request, monkeypatch):
    """``split``: every direct read goes as one-block chunks in flight (tiny experts split too)."""
    if request.param == "split":
        monkeypatch.setattr(store, "MIN_CHUNK", store.ALIGN)
    return request.param


@pytest.mark.parametrize("prefetch", [False, True])
def test_truncated_shard_mid_run(ckpt, tmp_path, prefetch, chunks):
    path, logits0 = ckpt
    shard = path / "model.safetensors"
    backup = tmp_path / "backup.safetensors"
    shutil.copy(shard, backup)
    m = tiered.load(path, policy="lru", cache_slots=2, prefetch=prefetch)
    try:
        assert torch.equal(m.logits(PROMPT), logits0)
        os.truncate(shard, shard.stat().st_size // 2)
        with pytest.raises(WeightError) as ei:
            for _ in range(3):
                m.logits(PROMPT)
        msg = str(ei.value)
        assert "model.safetensors" in msg and "expert" in msg and "layer" in msg
        assert "truncated" in msg and "experts." in msg  # names the tensor
        cache = m.hierarchy.cache
        # nothing half-read is marked valid: every valid slot holds exactly the right bytes
        shutil.copy(backup, shard)
        ref = moetier.load(path)
        for (layer, e) in cache.valid:
            w = m.hierarchy.layout.views(m.hierarchy.pool.slot(cache.slot_of[(layer, e)]))
            r = ref.provider.get(layer, e)
            assert torch.equal(w.gate_up, r.gate_up) and torch.equal(w.down, r.down)
        # with the file restored the same model recovers and is exact again
        assert torch.equal(m.logits(PROMPT), logits0)
    finally:
        m.hierarchy.close()


def test_io_error_names_expert_and_file(ckpt, monkeypatch, chunks):
    path, logits0 = ckpt
    m = tiered.load(path, policy="lru", cache_slots=1, prefetch=False)
    real = os.preadv

    def failing(fd, bufs, offset, *a):
        raise OSError(errno.EIO, "Input/output error")

    try:
        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(WeightError, match=r"model\.safetensors: layer \d+ expert \d+: tensor '.*experts\.\d+\..*' "
                                              r"read failed \(Input/output error\)"):
            m.logits(PROMPT)
        monkeypatch.setattr(os, "preadv", real)
        assert torch.equal(m.logits(PROMPT), logits0)
    finally:
        m.hierarchy.close()


def test_nan_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", num_hidden_layers=2)
    f = path / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    sd[name][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    # the in-RAM loader refuses at load; the tiered one when the expert is first read
    m = tiered.load(path, policy="lru", cache_slots=0)
    try:
        with pytest.raises(WeightError, match="layer 1 expert 3: gate/up weights contain NaN"):
            m.hierarchy.store.read_into(1, 3, m.hierarchy.pool.slot(0))
    finally:
        m.hierarchy.close()
