"""GGUF MLA with ``attn_k_b`` / ``attn_v_b`` kept as stored (issue 16): the loader keeps the
per-head parts in their GGUF types (``layers/mla.py: SplitKVB``, no float ``kv_b_proj``) and the
native decoder runs the absorb (W_UK[h]^T q_nope[h]) and W_UV[h] o_lat[h] as the formats'
products over their rows (``csrc/mla.c``, ``csrc/mla_many.c``: ``mla_desc.uk``).

- tests/data/gguf/deepseek2-q8_0.gguf (k_b F16 [nh C, dn = 16], v_b Q8_0) and re-quantized
  variants (v_b Q5_0 / Q4_0 / Q4_1, k_b BF16): ``SplitKVB.weight`` is the reader's float
  rebuild bit for bit; native (every ISA forced) within 1e-4 of the torch path over a 32-token
  prefill and greedy steps, same tokens; the native prefill is bit for bit the single steps;
  1 and 2 threads give the same bits; the decoder copies nothing;
- block-quantized ``attn_k_b`` (its rows are dn wide, and the fixture's dn = 16 is below every
  block size): the fixture widened to dn = 32 (``widen_nope``: random ``attn_q_b`` rows and
  ``attn_k_b`` for the wider heads, in Q8_0 / Q5_0 / Q4_1) goes through the same checks;
- the always-on bytes the budget charges (``stored_census``) are the bytes the loaded model
  holds, and the native decoder adds none (``MemoryBudget.native_bytes`` 0).
"""

from __future__ import annotations

import pytest
import torch

import moetier
from moetier import native
from moetier.layers.linear import QLinear
from moetier.layers.mla import SplitKVB
from moetier.quant import QTensor, nbytes
from tests.native.common import maxdiff, one_by_one, prefill_then_greedy

PROMPT = torch.randint(2, 250, (32,), generator=torch.Generator().manual_seed(16)).tolist()
STEPS = 8
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

VARIANTS = {  # name -> ({tensor suffix: ggml type name} re-quantized from the fixture)
    "fixture": {},
    "vb_q5_0": {"attn_v_b.weight": "Q5_0"},
    "vb_q4_0_kb_bf16": {"attn_v_b.weight": "Q4_0", "attn_k_b.weight": "BF16"},
    "vb_q4_1": {"attn_v_b.weight": "Q4_1"},
    # dn widened to 32 (widen_nope), so attn_k_b's rows hold whole 32-value blocks
    "kb_q8_0_dn32": {"attn_k_b.weight": "Q8_0"},
    "kb_q5_0_vb_q4_0_dn32": {"attn_k_b.weight": "Q5_0", "attn_v_b.weight": "Q4_0"},
    "kb_q4_1_dn32": {"attn_k_b.weight": "Q4_1"},
}
WIDE_DN = 32


def widen_nope(src, dst, dn: int, seed: int = 0) -> None:
    """``src`` (a deepseek2 GGUF with a q_lora_rank) with qk_nope_head_dim ``dn``: the keys that
    carry it and the tensors whose shape has it (``attn_q_b`` rows nh (dn + dr), ``attn_k_b``
    [nh, C, dn]) rewritten, with random values (the tests compare engines on the same file),
    in the source's types; everything else copied."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    meta = {k: f.contents() for k, f in r.fields.items()}
    dr, nh = int(meta[f"{arch}.rope.dimension_count"]), int(meta[f"{arch}.attention.head_count"])
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, dn + dr if name == f"{arch}.attention.key_length_mla" else f.contents(), vtype, sub)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        if t.name.endswith("attn_q_b.weight"):
            shape = [nh * (dn + dr), shape[1]]
        elif t.name.endswith("attn_k_b.weight"):
            shape = [shape[0], shape[1], dn]
        else:
            w.add_tensor(t.name, np.array(t.data).view(np.uint8).reshape(-1).reshape(
                *shape[:-1], -1), raw_dtype=t.tensor_type)
            continue
        values = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        w.add_tensor(t.name, gguf.quants.quantize(values, t.tensor_type), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    from tests.gguf.helpers import fixture, rewrite_gguf

    made: dict[str, object] = {}

    def get(name):
        if name not in made:
            src = fixture("deepseek2-q8_0")
            if name.endswith("_dn32"):
                wide = tmp_path_factory.mktemp("wide") / "deepseek2-dn32.gguf"
                widen_nope(src, wide, WIDE_DN)
                src = wide
            if not VARIANTS[name]:
                made[name] = src
            else:
                r = gguf.GGUFReader(src)
                requant = {t.name: int(gguf.GGMLQuantizationType[ty]) for t in r.tensors
                           for suf, ty in VARIANTS[name].items() if t.name.endswith(suf)}
                dst = tmp_path_factory.mktemp(name) / f"deepseek2-{name}.gguf"
                rewrite_gguf(src, dst, requant=requant)
                made[name] = dst
        return made[name]
    return get


def _types(m) -> tuple[str, str]:
    a = m.net.layers[0].self_attn.kv_b_proj
    assert isinstance(a, SplitKVB)
    return tuple(str(w.fmt if isinstance(w, QTensor) else w.dtype) for w in (a.k_b, a.v_b))  # type: ignore[return-value]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_split_kv_b_is_the_float_rebuild(gguf_file, name):
    from moetier.weights.gguf_io import GGUFIndex

    path = gguf_file(name)
    m = moetier.load(path, tokenizer=False, dtype="float32", native=False)
    idx = GGUFIndex(path)
    try:
        for i, layer in enumerate(m.net.layers):
            kvb = layer.self_attn.kv_b_proj
            assert isinstance(kvb, SplitKVB) and not list(kvb.parameters())
            want = idx.read(f"model.layers.{i}.self_attn.kv_b_proj.weight", torch.float32)
            assert torch.equal(kvb.weight, want)
    finally:
        idx.close()
    kb, vb = _types(m)
    want_v = VARIANTS[name].get("attn_v_b.weight", "Q8_0").lower()
    assert vb == want_v, (kb, vb)
    if name.endswith("_dn32"):
        assert kb == VARIANTS[name]["attn_k_b.weight"].lower(), (kb, vb)  # block-quantized k_b


@pytest.mark.parametrize("isa", native.isas_supported())
@pytest.mark.parametrize("name", list(VARIANTS))
def test_native_split_kv_b_matches_torch(lib, gguf_file, absorbed, name, isa):
    path = gguf_file(name)
    t = moetier.load(path, tokenizer=False, dtype="float32", native=False)
    m = moetier.load(path, tokenizer=False, dtype="float32")
    assert m.native_reason is None, m.native_reason
    assert m.net.native.copy_bytes == 0  # the stored parts are read in place
    assert all(d.uk and not d.kvb and not d.kvb_w for d in m.net.native.mla)
    want, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
    native.set_isa(isa)
    try:
        got, toks = prefill_then_greedy(m, PROMPT, STEPS)
        assert maxdiff(got, want) <= TOL and toks == toks_t, (maxdiff(got, want), toks, toks_t)
        pre = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
        assert torch.equal(pre, one_by_one(m, PROMPT)[0])  # absorbed prefill = the single steps
        n0 = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = one_by_one(m, PROMPT[:12])[0]
            torch.set_num_threads(2)
            two = one_by_one(m, PROMPT[:12])[0]
        finally:
            torch.set_num_threads(n0)
        assert torch.equal(one, two)
    finally:
        native.set_isa(None)


def test_default_prefill_takes_the_absorbed_form(lib, gguf_file):
    """No float kv_b_proj for the plain (decompressing) form: every run is absorbed, so the
    default prefill too is bit for bit the single steps."""
    m = moetier.load(gguf_file("vb_q5_0"), tokenizer=False, dtype="float32")
    pre = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    assert torch.equal(pre, one_by_one(m, PROMPT)[0])


@pytest.mark.parametrize("name", ["fixture", "vb_q5_0"])
def test_budget_counts_the_stored_parts(lib, gguf_file, name):
    from moetier.planner.census import census
    from moetier.weights import tiered
    from moetier.weights.gguf_io import stored_census

    path = gguf_file(name)
    m = moetier.load(path, tokenizer=False, dtype="float32")
    st = stored_census(path, census(m.spec, "fp32"), torch.float32)
    held = sum(p.numel() * p.element_size() for p in m.net.parameters())
    for mod in m.net.modules():
        if isinstance(mod, QLinear):
            held += nbytes(mod.qweight)
        elif isinstance(mod, SplitKVB):
            held += nbytes(mod.k_b) + nbytes(mod.v_b)
    assert st.always_on_bytes == held
    h = tiered.load(path, max_ram="2G", tokenizer=False, dtype="float32")
    try:
        assert h.memory_budget.native_bytes == h.net.native.copy_bytes == 0
    finally:
        h.hierarchy.close()
