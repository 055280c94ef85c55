"""Native MLA with ``kv_b_proj`` stored quantized (issues 14/16: DeepSeek-V3/R1 and Kimi-K2 FP8
releases, ``--quantize-all``): the decoder dequantizes it once at build (``native/mla.py:
plain_kv_b``, the torch path's ``QLinear.weight``) and runs natively.

- a DeepSeek-V3 FP8 release-layout checkpoint (every linear F8_E4M3 + ``weight_scale_inv`` per
  128x128 block; kv_b_proj [160, 40], neither dim a multiple of 128) and the same model
  quantized at load with int4 / int8 groups (quantize_all: kv_b_proj included): compute_paths
  native for decode / prefill / batch; float32: a 32-token native prefill and 16 greedy steps
  within 1e-4 of the torch path, same tokens; the native prefill is bit for bit the native
  single steps (absorbed form); the copy is the torch path's dequantized weight, bit for bit;
- the ``--max-ram`` budget charges the copy (``MemoryBudget.native_bytes``) before loading, in
  the estimate, in the cache sizing after loading and in the total, and the header-based charge
  equals what the decoder made;
- every ISA (MOETIER_ISA paths); a GGUF whose kv_b_proj is one Q8_0 ``attn_kv_b``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers the deepseek recipes)
from moetier import native
from moetier.native.mla import plain_copy_bytes
from moetier.quant import QTensor
from moetier.weights import budget as B
from moetier.weights import tiered
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.quantized import make_quantized_checkpoint
from tests.native.common import maxdiff, one_by_one, prefill_then_greedy

PROMPT = torch.randint(2, 250, (32,), generator=torch.Generator().manual_seed(14)).tolist()
STEPS = 16
TOL = 1e-4
# kv_b_proj [nh (dn + dv), C] = [4 * (16 + 24), 40]: a partial 128-row block and a partial column block
ODD = dict(qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=40)
CASES = {  # name -> (quantized release format or None, moetier.load options)
    "fp8_release": ("fp8", {}),
    "int4_all": (None, dict(quantize="int4", quantize_all=True, quantize_group=32)),
    "int8_all": (None, dict(quantize="int8", quantize_all=True, quantize_group=32)),
}
FMT = {"fp8_release": "fp8_e4m3_block", "int4_all": "int4_group", "int8_all": "int8_group"}


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    made: dict[str, object] = {}

    def get(fmt):
        if fmt not in made:
            d = tmp_path_factory.mktemp(f"v3_{fmt}")
            made[fmt] = (make_quantized_checkpoint(d, "deepseek_v3", fmt, block=(128, 128), tokenizer=False, **ODD)
                         if fmt else make_tiny_checkpoint(d, "deepseek_v3", tokenizer=False, **ODD))
        return made[fmt]

    return get


def load(ckpt, name, **kw):
    fmt, opts = CASES[name]
    return moetier.load(ckpt(fmt), tokenizer=False, **opts, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_kv_b_runs_natively(lib, ckpt, absorbed, name):
    m, t = load(ckpt, name), load(ckpt, name, native=False)
    assert m.native_reason is None, m.native_reason
    assert {k: (v["path"], v["reason"]) for k, v in m.compute_paths().items()} == {
        "decode": ("native", None), "prefill": ("native", None), "batch": ("native", None)}
    dec, spec = m.net.native, m.spec
    for layer in m.net.layers:
        q = getattr(layer.self_attn.kv_b_proj, "qweight", None)
        assert isinstance(q, QTensor) and q.fmt == FMT[name] and q.shape == (160, 40)
    assert dec.copy_bytes == plain_copy_bytes(spec, 4) == spec.num_layers * 160 * 40 * 4
    # the copy the kernels read is the torch path's per-use dequantized weight, bit for bit
    import ctypes

    for i, (m_desc, layer) in enumerate(zip(dec.mla, m.net.layers, strict=True)):
        want = layer.self_attn.weights().kv_b_proj
        got = torch.frombuffer((ctypes.c_float * want.numel()).from_address(m_desc.kvb), dtype=torch.float32)
        assert torch.equal(got.view_as(want), want), f"layer {i}"

    got, toks = prefill_then_greedy(m, PROMPT, STEPS)
    want, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
    assert got.shape == want.shape == (len(PROMPT) + STEPS, spec.vocab_size) and torch.isfinite(got).all()
    assert maxdiff(got, want) <= TOL, f"{name}: max |native - torch| {maxdiff(got, want):.3g}"
    assert toks == toks_t
    paths = m.compute_paths()
    assert paths["prefill"]["steps"] == 1 and paths["decode"]["steps"] == STEPS

    pre = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    one, _ = one_by_one(m, PROMPT)
    assert torch.equal(pre, one), maxdiff(pre, one)
    a, b = m.new_sequence(), m.new_sequence()  # a batched step (prefill chunk + single token)
    m.step([(a, PROMPT[:5])])
    batch = m.step([(a, [PROMPT[5]]), (b, PROMPT[:7])])
    assert m.compute_paths()["batch"]["steps"] == 1
    c, d = m.new_sequence(), m.new_sequence()
    m.step([(c, PROMPT[:5])])
    assert torch.equal(batch[0], m.step([(c, [PROMPT[5]])])[0])
    assert torch.equal(batch[1], m.step([(d, PROMPT[:7])])[0])


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_isa(lib, ckpt, absorbed, isa):
    """The FP8 release (its other projections through each ISA's FP8 row kernels): native prefill
    = native single steps, within 1e-4 of the torch path."""
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa} (supported: {native.isas_supported()})")
    native.set_isa(isa)
    try:
        assert native.isa() == isa
        m, t = load(ckpt, "fp8_release"), load(ckpt, "fp8_release", native=False)
        assert m.native_reason is None, m.native_reason
        got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
        assert torch.equal(got, one_by_one(m, PROMPT)[0]), isa
        assert maxdiff(got, t.step([(t.new_sequence(), PROMPT)], all_logits=True)) <= TOL
    finally:
        native.set_isa(None)


def test_bfloat16_copy_is_the_torch_weight(lib, ckpt, absorbed):
    """bfloat16 model: the copy holds the values the torch path reads (dequantized in float32,
    rounded to bfloat16 once), 2 bytes each."""
    m = load(ckpt, "fp8_release", dtype="bfloat16")
    assert m.native_reason is None, m.native_reason
    import ctypes

    layer, desc = m.net.layers[1], m.net.native.mla[1]
    want = layer.self_attn.weights().kv_b_proj
    assert want.dtype == torch.bfloat16
    raw = torch.frombuffer((ctypes.c_int16 * want.numel()).from_address(desc.kvb), dtype=torch.int16)
    assert torch.equal(raw.view(torch.bfloat16).view_as(want), want)
    assert m.net.native.copy_bytes == plain_copy_bytes(m.spec, 2)
    pre = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    one, _ = one_by_one(m, PROMPT)
    assert torch.equal(pre, one)


# ----------------------------------------------------------------------------------------
# the RAM budget charges the copy


@pytest.mark.parametrize("name", ["fp8_release", "int4_all", "plain"])
def test_budget_charges_the_copy(lib, ckpt, name):
    fmt, opts = CASES.get(name, (None, {}))
    m = tiered.load(ckpt(fmt), max_ram="2G", tokenizer=False, **opts)
    try:
        b = m.memory_budget
        assert m.native_reason is None, m.native_reason
        # the charge made from the tensor headers before loading is what the decoder copied
        assert b.native_bytes == m.net.native.copy_bytes
        assert b.native_bytes == (0 if name == "plain" else plain_copy_bytes(m.spec, 4)), b.native_bytes
        assert b.total_reserved == dataclasses.replace(b, native_bytes=0).total_reserved + b.native_bytes
    finally:
        m.hierarchy.close()
    off = tiered.load(ckpt(fmt), max_ram="2G", tokenizer=False, native=False, **opts)
    try:
        assert off.memory_budget.native_bytes == 0  # no native decoder, no copy
    finally:
        off.hierarchy.close()


def test_budget_estimate_and_cache_sizing_count_native_bytes(ckpt):
    """Before loading (check_upfront: the smallest --max-ram and its refusal) and after it
    (cache_slots_for: the copy is made after the RSS it measures), native_bytes is charged."""
    from moetier.spec import load_spec

    spec = load_spec(ckpt("fp8"))
    extra, slot = 200 * 10**6, 8 * 2**20

    def smallest(native_bytes):
        mb = B.MemoryBudget(max_ram=10**12, baseline_rss=500 * 10**6, native_bytes=native_bytes)
        return B.check_upfront(spec, mb, always_on_bytes=10**6, slot_bytes=slot, transient_slots=2)

    assert smallest(extra) >= smallest(0) + extra
    mb = B.MemoryBudget(max_ram=600 * 10**6, baseline_rss=500 * 10**6, native_bytes=extra)
    with pytest.raises(B.BudgetError, match=r"native decoder copies 200 MB"):
        B.check_upfront(spec, mb, always_on_bytes=10**6, slot_bytes=slot, transient_slots=2)

    def slots(native_bytes):
        mb = B.MemoryBudget(max_ram=B.rss_bytes() + 4 * 10**9, native_bytes=native_bytes)
        plan = type("Plan", (), {"max_ram": mb.max_ram})()
        return B.cache_slots_for(spec, plan, slot_bytes=slot, n_pinned=0, prefetch_slots=0, bypass_slots=0,
                                 budget=mb)

    # the RSS is measured again by each call (it moves by far less than a slot between them)
    assert slots(0) - slots(10 * slot) in (9, 10, 11)


# ----------------------------------------------------------------------------------------
# GGUF: an older-converter file whose kv_b_proj is one quantized attn_kv_b tensor


def gguf_with_attn_kv_b(dst):
    """tests/data/gguf/deepseek2-q8_0.gguf with each layer's attn_k_b / attn_v_b pair replaced by
    one Q8_0 ``attn_kv_b`` [nh (dn + dv), C] (the layout older llama.cpp converters wrote)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from moetier.quant.ggml_quantize import quantize
    from moetier.weights.gguf_io import GGUFIndex
    from tests.gguf.helpers import fixture

    src = fixture("deepseek2-q8_0")
    idx = GGUFIndex(src)
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        w.add_key_value(name, f.contents(), vtype, f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for t in r.tensors:
        if t.name.endswith("attn_v_b.weight"):
            continue
        if t.name.endswith("attn_k_b.weight"):
            i = t.name.split(".")[1]
            kv = idx.read(f"model.layers.{i}.self_attn.kv_b_proj.weight", torch.float32).numpy()  # [rows, C]
            w.add_tensor(f"blk.{i}.attn_kv_b.weight", quantize(kv, "Q8_0"), raw_dtype=q8)
            continue
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        data = np.array(t.data).view(np.uint8).reshape(-1)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(t.name, data.reshape(*shape[:-1], shape[-1] // bs * ts), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_gguf_quantized_attn_kv_b(lib, tmp_path, absorbed):
    path = gguf_with_attn_kv_b(tmp_path / "deepseek2-kvb-q8_0.gguf")
    m = moetier.load(path, tokenizer=False, dtype="float32")
    t = moetier.load(path, tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None, m.native_reason
    q = getattr(m.net.layers[0].self_attn.kv_b_proj, "qweight", None)
    assert isinstance(q, QTensor) and q.fmt == "q8_0"
    assert m.net.native.copy_bytes == plain_copy_bytes(m.spec, 4)
    got, toks = prefill_then_greedy(m, PROMPT, STEPS)
    want, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
    assert maxdiff(got, want) <= TOL and toks == toks_t
    pre = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    assert torch.equal(pre, one_by_one(m, PROMPT)[0])
    h = tiered.load(path, max_ram="2G", tokenizer=False, dtype="float32")
    try:
        assert h.memory_budget.native_bytes == h.net.native.copy_bytes == m.net.native.copy_bytes
    finally:
        h.hierarchy.close()
