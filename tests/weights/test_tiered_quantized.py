"""The hierarchy in quantized bytes (issue 14 item 4): the store reads a quantized expert's stored
byte ranges straight into its slot (O_DIRECT or buffered, chunks in flight), slots and --max-ram
count stored bytes, and tiered runs are bit-identical to in-RAM runs of the same quantized model
for every released format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek_v3 / gpt_oss recipes)
from moetier.errors import WeightError
from moetier.quant import intgroup
from moetier.weights import store as store_mod
from moetier.weights.cache import SlotPool
from moetier.weights.store import ALIGN, ExpertStore, StoredSlotLayout
from tests.helpers.quantized import make_quantized_checkpoint

CASES = {
    "qwen3_moe_int4_g32": ("qwen3_moe", "int4", dict(group=32)),
    # down_proj rows end in a partial group of 32
    "mixtral_int4_g32_partial": ("mixtral", "int4", dict(group=32, intermediate_size=48)),
    "mixtral_int8_g64_experts": ("mixtral", "int8", dict(group=64, experts_only=True)),
    "deepseek_v3_fp8_b16": ("deepseek_v3", "fp8", dict(block=(16, 16))),
}


def _ckpt(tmp_path, case, **extra):
    family, fmt, kw = CASES[case]
    return make_quantized_checkpoint(tmp_path, family, fmt, tokenizer=False, num_hidden_layers=2, **kw, **extra)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("io,depth", [("buffered", 1), ("direct", 1), ("direct", 4)])
def test_store_reads_stored_bytes_into_slots(tmp_path, case, io, depth, monkeypatch):
    """Every leaf of every expert (packed values, scales) equals the reader's, byte for byte, read
    from the files' byte ranges (the reader's own ``read`` is never called after the layout)."""
    monkeypatch.setattr(store_mod, "MIN_CHUNK", ALIGN)  # tiny experts split into several chunks too
    ck = _ckpt(tmp_path, case)
    m = moetier.load(ck, tokenizer=False)
    reader = m.expert_reader
    store = ExpertStore(reader, io=io, io_depth=depth)
    assert store._stored and store.io == io
    assert isinstance(store.layout, StoredSlotLayout)
    calls = []
    real = type(reader).read
    monkeypatch.setattr(type(reader), "read", lambda self, *a: calls.append(a) or real(self, *a))
    pool = SlotPool(2, store.layout.slot_bytes)
    try:
        for layer in m.spec.moe_layer_ids:
            for e in range(m.spec.num_experts):
                w = store.read_into(layer, e, pool.slot(e % 2))
                n_calls = len(calls)
                r = reader.read(layer, e)
                assert len(calls) == n_calls + 1  # only the reference read above
                got, want = dict(w.leaves()), dict(r.leaves())
                assert set(got) == set(want)
                assert all(_same_bytes(got[k], want[k]) for k in want)
                assert store.last_bytes() == r.nbytes
                assert torch.equal(w.down.dequantize(), r.down.dequantize())
    finally:
        store.close()


def test_store_nan_scale_is_one_clear_error(tmp_path):
    ck = _ckpt(tmp_path, "qwen3_moe_int4_g32")
    f = ck / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale"
    sd[name] = sd[name].clone()
    sd[name][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    m = moetier.load(ck, tokenizer=False, expert_cache=0.25, policy="lru", io="direct")  # reads no expert 3
    store = m.hierarchy.store
    assert store._stored
    pool = SlotPool(1, store.layout.slot_bytes)
    with pytest.raises(WeightError, match=r"layer 1 expert 3: up\.scale scales contain NaN or Inf"):
        store.read_into(1, 3, pool.slot(0))
    store.read_into(1, 2, pool.slot(0))  # its neighbours read fine
    m.hierarchy.close()


def test_zero_points_go_through_the_reader(tmp_path):
    """Zero points are unpacked at read (the file packs them along rows): such experts are not
    byte copies of the file, so the store reads them through ``reader.read`` (same bytes)."""
    ck = _ckpt(tmp_path, "qwen3_moe_int4_g32")
    f = ck / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(0)
    for k in [k for k in sd if k.endswith(".weight_scale") and ".experts." in k]:
        rows, groups = sd[k].shape
        zero = torch.randint(-8, 8, (rows, groups), generator=g, dtype=torch.int8)
        sd[k[: -len("scale")] + "zero_point"] = intgroup.pack_zero(zero, 4)
    save_file(sd, f, metadata={"format": "pt"})
    m = moetier.load(ck, tokenizer=False)
    store = ExpertStore(m.expert_reader, io="direct")
    assert not store._stored and store._generic
    pool = SlotPool(1, store.layout.slot_bytes)
    w = store.read_into(1, 5, pool.slot(0))
    r = m.expert_reader.read(1, 5)
    assert w.gate.zero is not None
    assert all(_same_bytes(a, b) for (_, a), (_, b) in zip(w.leaves(), r.leaves()))
    store.close()


CASES_TIERED = {**CASES, "gpt_oss_mxfp4": ("gpt_oss", "mxfp4", {})}


@pytest.mark.parametrize("case", CASES_TIERED)
@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_tiered_equals_in_ram(tmp_path, case, io):
    """A quarter of the experts cached, prefetch on, reads direct or buffered: logits of a prefill
    and the greedy tokens of a decode (native path where it covers the format) are the in-RAM
    model's, bit for bit; the slots hold stored bytes."""
    family, fmt, kw = CASES_TIERED[case]
    ck = make_quantized_checkpoint(tmp_path, family, fmt, tokenizer=False, num_hidden_layers=2, **kw)
    ram = moetier.load(ck, tokenizer=False)
    tiered = moetier.load(ck, tokenizer=False, expert_cache=0.25, policy="lru", prefetch=True, io=io)
    try:
        assert tiered.native_reason == ram.native_reason
        prov = tiered.hierarchy
        assert prov.store.io == io or not prov.store._stored
        assert prov.store._stored == (family != "gpt_oss")  # gpt-oss: its own reader (interleaved rows)
        assert prov.layout.expert_bytes == ram.expert_reader.expert_nbytes()
        assert prov.slot_bytes == prov.layout.slot_bytes < 1.5 * prov.layout.expert_bytes + 16 * ALIGN
        ids = list(range(3, 40))
        assert torch.equal(tiered.logits(ids), ram.logits(ids))
        a = tiered.generate_ids(ids[:5], max_tokens=10)
        b = ram.generate_ids(ids[:5], max_tokens=10)
        assert a.ids == b.ids and len(a.ids) == 10
        s = tiered.hierarchy_metrics.summary()
        assert s["store_reads"] > 0 and s["bytes_per_token"]["store"] > 0
    finally:
        tiered.hierarchy.close()


def test_max_ram_counts_stored_bytes(tmp_path):
    """--max-ram with a quantized checkpoint: the budget's slot is the stored-format slot (not a
    bf16 one), the cache holds several times more experts than bf16 slots would, and the planner's
    prediction is made at the stored precision."""
    ck = _ckpt(tmp_path, "qwen3_moe_int4_g32", moe_intermediate_size=512, hidden_size=256)
    m = moetier.load(ck, tokenizer=False, max_ram="2G", prefetch=True)
    try:
        s = m.spec
        bf16_slot = -(-3 * s.hidden_size * s.expert_intermediate_size * 2 // ALIGN) * ALIGN
        budget = m.memory_budget.to_json()
        assert budget["slot_bytes"] == m.hierarchy.slot_bytes < bf16_slot / 3
        assert m.placement_precision.startswith("mixed:") and "routed_experts=int4:g32" in m.placement_precision
        from moetier.planner.census import census

        cen = census(s, m.placement_precision)
        assert abs(cen.expert_bytes - m.hierarchy.layout.expert_bytes) <= 64  # weight_shape etc. not held
    finally:
        m.hierarchy.close()
