"""Native multi-token steps (moetier/native/prefill.py, csrc/prefill.c, csrc/gemm.c): prefill and
batched steps of the generic families.

- float32, every generic family config: a 40-token native prefill and 16 greedy steps agree
  with the torch path within 1e-4 (max |logit difference|), same greedy tokens;
- a prefill (all logits) is bit for bit the same tokens stepped one at a time natively, and so is
  every sequence of a batched step (mixed prefill chunks and single tokens) vs stepping each
  sequence alone: the server's outputs do not depend on who else is served;
- results do not depend on the thread count, the ISA, the expert provider (per-expert calls,
  recycled slots, tiered cache), the whole-step vs per-layer (hooks, observers) path, or the
  weight format (quantized at load, GGUF files);
- every family's native decoder has the multi-token path (MLA: tests/native/test_mla_prefill.py,
  gpt-oss / Llama-4: tests/native/test_ext_prefill.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moetier
from moetier import native
from tests.native.common import (
    DelegatingProvider,
    RecyclingProvider,
    ckpt_fixture,
    count_many,
    kv,
    load,
    maxdiff,
    one_by_one,
    prefill_then_greedy,
    same_kv,
    wrapped,
)
from tests.native.test_decode import CONFIGS

PROMPT = torch.randint(0, 250, (40,), generator=torch.Generator().manual_seed(11)).tolist()
STEPS = 16
GGUF = Path(__file__).resolve().parents[1] / "data" / "gguf"


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

ckpt = ckpt_fixture(CONFIGS)


# ----------------------------------------------------------------------------------------
# 1. float32 vs the torch path, every generic family


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_prefill_matches_torch(lib, ckpt, name):
    m, t = load(ckpt(name)), load(ckpt(name), native=False)
    assert m.native_reason is None
    calls = count_many(m)
    got, toks = prefill_then_greedy(m, PROMPT, STEPS)
    want, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
    assert calls == [len(PROMPT)]  # the prefill ran natively, the steps did not go through it
    assert got.shape == want.shape == (len(PROMPT) + STEPS, m.spec.vocab_size)
    assert torch.isfinite(got).all()
    assert maxdiff(got, want) <= 1e-4, f"{name}: max |native - torch| {maxdiff(got, want):.3g}"
    assert toks == toks_t
    assert m.compute_paths()["prefill"] == {"path": "native", "reason": None, "steps": 1}


# ----------------------------------------------------------------------------------------
# 2. bit-identical to single-token steps; batches independent of their mates


@pytest.mark.parametrize("name", ["qwen2_moe_shared", "qwen3_moe_mlp_only", "mixtral_window", "llama_bias_tied",
                                  "olmoe_full_qknorm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_is_single_steps(lib, ckpt, name, dtype):
    m = load(ckpt(name), dtype=dtype)
    seq = m.new_sequence()
    got = m.step([(seq, PROMPT)], all_logits=True)
    want, ref = one_by_one(m, PROMPT)
    assert torch.equal(got, want), maxdiff(got, want)
    assert same_kv(kv(seq), kv(ref))  # the KV written in place is the single steps' too
    # last-token logits only (the default) are that row
    assert torch.equal(m.step([(m.new_sequence(), PROMPT)]), want[-1:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_steps_equal_one_by_one(lib, ckpt, dtype):
    """Five sequences with different histories, one flat batch mixing prefill chunks and single
    tokens, then batched decode steps: every row equals that sequence stepped alone."""
    m = load(ckpt("qwen2_moe_shared"), dtype=dtype)
    calls = count_many(m)
    prompts = [PROMPT[: 3 + 7 * i] for i in range(5)]
    seqs = [m.new_sequence() for _ in prompts]
    for s, p in zip(seqs[:3], prompts[:3], strict=True):  # three already running
        m.step([(s, p)])
    first = m.step([(seqs[0], [9]), (seqs[3], prompts[3]), (seqs[1], [8]), (seqs[4], prompts[4]), (seqs[2], [7])])
    order = [0, 3, 1, 4, 2]
    toks = {i: int(first[j].argmax()) for j, i in enumerate(order)}
    rows = [first]
    for _ in range(4):
        out = m.step([(seqs[i], [toks[i]]) for i in range(5)])
        rows.append(out)
        toks = {i: int(out[i].argmax()) for i in range(5)}
    assert calls[3:] == [1 + len(prompts[3]) + 1 + len(prompts[4]) + 1] + [5] * 4
    # reference: each sequence alone (its prompt, then its own tokens one by one)
    for j, i in enumerate(order):
        alone = m.new_sequence()
        if i < 3:
            m.step([(alone, prompts[i])])
            want = m.step([(alone, [9 - i])])
        else:
            want = m.step([(alone, prompts[i])])
        assert torch.equal(first[j], want[0]), (i, maxdiff(first[j], want[0]))
        for r in rows[1:]:
            want = m.step([(alone, [int(want[0].argmax())])])
            assert torch.equal(r[i], want[0]), (i, maxdiff(r[i], want[0]))
        assert same_kv(kv(seqs[i]), kv(alone))


@pytest.mark.parametrize("all_logits", [False, True])
def test_long_batches_split_into_calls(lib, ckpt, monkeypatch, all_logits):
    """Batches above MAX_CALL_TOKENS run as several calls (bounded scratch): the same bits."""
    from moetier.native import prefill

    m = load(ckpt("qwen2_moe_shared"))
    a0, b0 = m.new_sequence(), m.new_sequence()
    m.step([(a0, PROMPT[:5])])
    want = m.step([(a0, PROMPT[5:25]), (b0, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=all_logits)
    calls = count_many(m)
    monkeypatch.setattr(prefill, "MAX_CALL_TOKENS", 7)
    a, b = m.new_sequence(), m.new_sequence()
    m.step([(a, PROMPT[:5])])
    got = m.step([(a, PROMPT[5:25]), (b, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=all_logits)
    assert calls == [5, 34]  # the step_many calls; inside, 34 tokens went as 5 native calls
    assert got.shape == want.shape == ((34 if all_logits else 3), m.spec.vocab_size)
    assert torch.equal(got, want)
    assert a.length == 25 and b.length == 13 and same_kv(kv(a), kv(a0)) and same_kv(kv(b), kv(b0))


# ----------------------------------------------------------------------------------------
# 3. thread count, ISA


@pytest.mark.parametrize("name", ["qwen3_moe_wide", "qwen2_moe_wide"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_bit_identical(lib, ckpt, name, dtype):
    """200 tokens: every product, the attention and the head really split over threads."""
    m = load(ckpt(name), dtype=dtype)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    before = torch.get_num_threads()
    runs = {}
    try:
        for nth in (1, 2, 3, 16):
            torch.set_num_threads(nth)
            seq = m.new_sequence()
            logits = m.step([(seq, prompt)], all_logits=True)
            a, b = m.new_sequence(), m.new_sequence()
            m.step([(a, prompt[:50])])
            batch = m.step([(a, [5]), (b, prompt[:120])])
            runs[nth] = (logits, batch, kv(seq))
    finally:
        torch.set_num_threads(before)
    for nth, (logits, batch, cache) in runs.items():
        assert torch.equal(logits, runs[1][0]), f"{nth} threads: max diff {maxdiff(logits, runs[1][0]):.3g}"
        assert torch.equal(batch, runs[1][1])
        assert same_kv(cache, runs[1][2])


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_isa(lib, ckpt, isa):
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")
    native.set_isa(isa)
    try:
        assert native.isa() == isa
        for dtype in ("float32", "bfloat16"):
            m = load(ckpt("qwen2_moe_shared"), dtype=dtype)
            got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
            want, _ = one_by_one(m, PROMPT)
            assert torch.equal(got, want), (isa, dtype, maxdiff(got, want))
            if dtype == "float32":
                t = load(ckpt("qwen2_moe_shared"), native=False)
                assert maxdiff(got, t.step([(t.new_sequence(), PROMPT)], all_logits=True)) <= 1e-4
    finally:
        native.set_isa(None)


def _gemm_vs_gemv(lib, w, T: int, bias: torch.Tensor | None, nth: int,
                  x_f32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mt_gemm of T random rows, the same rows one mt_gemv each)."""
    import ctypes

    from moetier.native.prefill import _declare
    from moetier.native.weights import describe

    _declare(lib)
    d = describe(w, x_f32=x_f32)
    x = torch.randn(T, d.cols, generator=torch.Generator().manual_seed(T))
    got = torch.full((T + 1, d.rows), float("nan"))  # a sentinel row past the end
    b = None if bias is None else bias.data_ptr()
    bdt = 1 if bias is not None and bias.dtype == torch.bfloat16 else 0
    lib.mt_gemm(ctypes.byref(d), b, bdt, x.data_ptr(), T, got.data_ptr(), nth)
    want = torch.empty(T, d.rows)
    for t in range(T):
        lib.mt_gemv(ctypes.byref(d), b, bdt, x[t].contiguous().data_ptr(), want[t].data_ptr(), 1)
    assert torch.isnan(got[T]).all()  # nothing written past the last row
    return got[:T], want


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16_f32x"])
def test_gemm_is_gemv_per_row(lib, isa, dtype):
    """The multi-token engine (row blocks, register tiles of 2 rows x 3 or 2 tokens where a format
    has them: T = 4, 5, 7, 8 split 2+2, 3+2, 3+2+2, 3+3+2; the avx512bf16 tile 2 rows x up to 6
    tokens: T = 6, 11, 13 as 6, 6+5, 5+4+4, or up to 4 on rows too wide for 6 in L1 (2600
    columns); odd rows and tokens left over) gives every (token, row)
    the single-token product's bits. bf16_f32x: bf16 weights with float32 activations (a float32
    model's bf16 parts)."""
    x_f32 = dtype == "bf16_f32x"
    dtype = torch.bfloat16 if x_f32 else dtype
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")
    native.set_isa(isa)
    try:
        for rows, cols in [(1, 1), (2, 31), (3, 33), (7, 65), (9, 100), (64, 256), (33, 1031), (130, 96), (6, 2600)]:
            w = torch.randn(rows, cols).to(dtype)
            for T in (1, 2, 3, 4, 5, 6, 7, 8, 11, 13):
                for bias in (None, torch.randn(rows).to(dtype)):
                    for nth in (1, 3):
                        got, want = _gemm_vs_gemv(lib, w, T, bias, nth, x_f32)
                        assert torch.equal(got, want), (isa, rows, cols, T, bias is not None, nth)
    finally:
        native.set_isa(None)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "mxfp4"])
def test_gemm_quantized_is_gemv_per_row(lib, fmt):
    from moetier.quant.convert import quantize_weight

    q = quantize_weight(torch.randn(40, 512), fmt, group=32, block=(16, 128))
    for isa in native.isas_supported():
        native.set_isa(isa)
        try:
            for T in (1, 5):
                got, want = _gemm_vs_gemv(lib, q, T, None, 2)
                assert torch.equal(got, want), (fmt, isa, T)
        finally:
            native.set_isa(None)


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0", "q5_0", "ggml_mxfp4"])
def test_gemm_ggml_tiles_are_gemv_per_row(lib, fmt, isa):
    """GGUF formats with multi-token tiles (up to 4 tokens per pass over a row, the rest per
    token; 130 tokens cross the engine's 128-token blocks): every (token, row) has the
    single-token row kernel's bits, rows in strided buffers, with and without bias."""
    pytest.importorskip("gguf")
    from moetier.native.weights import GGML_BLOCKS
    from moetier.quant import QTensor
    from tests.native.test_quant_kernels import GGML_TYPE, ggml_blocks, strided

    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")
    gen = torch.Generator().manual_seed(GGML_TYPE[fmt])
    native.set_isa(isa)
    try:
        bs = GGML_BLOCKS[fmt][1]
        for rows, cols in [(1, 256), (5, 768), (33, 256), (7, 512 + 256), *([(3, 416)] if bs == 32 else [])]:
            data = ggml_blocks(fmt, rows, cols, gen)
            for w in (QTensor(fmt, (rows, cols), data, block=(1, bs)),
                      QTensor(fmt, (rows, cols), strided(data, gen), block=(1, bs))):
                for T in (1, 2, 3, 4, 5, 6, 7, 130):
                    bias = torch.randn(rows, generator=gen) if T % 2 else None
                    for nth in (1, 2) if T in (7, 130) else (1,):
                        got, want = _gemm_vs_gemv(lib, w, T, bias, nth)
                        assert torch.isfinite(want).all()
                        assert torch.equal(got, want), (fmt, isa, rows, cols, T, nth, maxdiff(got, want))
    finally:
        native.set_isa(None)


@pytest.mark.parametrize("isa", native.ISAS)
def test_gemm_mxfp4_tiles_are_gemv_per_row(lib, isa):
    """gpt-oss MXFP4 with multi-token tiles: every (token, row) has the row kernel's bits, for
    partial groups and chunks (odd column counts), strided rows and gate/up interleaved rows."""
    from moetier.quant import QTensor
    from tests.native.test_quant_kernels import strided

    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")
    gen = torch.Generator().manual_seed(7)
    native.set_isa(isa)
    try:
        for rows, cols in [(1, 32), (5, 90), (33, 640), (7, 17), (6, 2880)]:
            groups = -(-cols // 32)
            data = torch.randint(0, 256, (2 * rows, 16 * groups), generator=gen, dtype=torch.uint8)
            scale = torch.randint(110, 140, (2 * rows, groups), generator=gen, dtype=torch.uint8)
            for w in (QTensor("mxfp4", (rows, cols), data[:rows], scale[:rows], block=(1, 32)),
                      QTensor("mxfp4", (rows, cols), strided(data[:rows], gen), scale[:rows], block=(1, 32)),
                      QTensor("mxfp4", (rows, cols), data[0::2], scale[0::2], block=(1, 32))):
                for T in (1, 2, 3, 4, 5, 7, 130):
                    bias = torch.randn(rows, generator=gen) if T % 2 else None
                    for nth in (1, 2) if T in (7, 130) else (1,):
                        got, want = _gemm_vs_gemv(lib, w, T, bias, nth)
                        assert torch.isfinite(want).all()
                        assert torch.equal(got, want), (isa, rows, cols, T, nth, maxdiff(got, want))
    finally:
        native.set_isa(None)


# ----------------------------------------------------------------------------------------
# 4. providers, hooks and observers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_providers_and_paths_bit_identical(lib, ckpt, dtype):
    path = ckpt("qwen2_moe_shared")
    base = load(path, dtype=dtype)
    want, toks = prefill_then_greedy(base, PROMPT, 6)
    assert base.net.native.table_for is base.provider  # the whole-step call ran
    for cls in (DelegatingProvider, RecyclingProvider):  # one expert per native call
        m = load(path, dtype=dtype, expert_provider_factory=wrapped(cls))
        got, toks_p = prefill_then_greedy(m, PROMPT, 6)
        assert torch.equal(got, want), (cls.__name__, maxdiff(got, want))
    tiered = moetier.load(path, tokenizer=False, dtype=dtype, policy="lru", cache_slots=2, prefetch=True)
    try:
        got, _ = prefill_then_greedy(tiered, PROMPT, 6)
        assert torch.equal(got, want), maxdiff(got, want)
        assert tiered.hierarchy_metrics.accesses > 0
    finally:
        tiered.hierarchy.close()
    # a router observer forces the per-layer path: same bits, and it sees [T, k] routings
    # equal to the torch path's
    m = load(path, dtype=dtype)
    seen: list = []
    m.add_router_observer(lambda layer, ids, w: seen.append((layer, ids, w)))
    got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    assert torch.equal(got, want[: len(PROMPT)])
    assert m.net.native.table_for is None
    k = m.spec.top_k
    assert [s[0] for s in seen] == sorted(m.net.moe_blocks())
    assert all(ids.shape == (len(PROMPT), k) and ids.dtype == torch.int64 and w.dtype == m.dtype
               for _, ids, w in seen)
    if dtype == "float32":
        t = load(path, native=False)
        seen_t: list = []
        t.add_router_observer(lambda layer, ids, w: seen_t.append((layer, ids, w)))
        t.step([(t.new_sequence(), PROMPT)])
        for (la, ia, wa), (lb, ib, wb) in zip(seen, seen_t, strict=True):
            assert la == lb and torch.equal(ia, ib) and maxdiff(wa, wb) < 1e-5


def test_norm_prehooks_see_the_batch(lib, ckpt):
    """The hierarchy's router prefetch hooks the post-attention norm: it gets [T, H] in the model dtype."""
    m = load(ckpt("qwen3_moe_mlp_only"))
    got: list = []
    norm = m.net.layers[0].post_attention_layernorm
    norm.register_forward_pre_hook(lambda mod, args: got.append(args[0].shape))
    m.step([(m.new_sequence(), PROMPT)])
    assert got == [torch.Size([len(PROMPT), m.spec.hidden_size])]


# ----------------------------------------------------------------------------------------
# 5. quantized weights


@pytest.mark.parametrize("quant", ["int4", "int8", "fp8"])
def test_quantized_at_load(lib, ckpt, quant):
    group = None if quant == "fp8" else 32
    m = load(ckpt("qwen2_moe_wide"), quantize=quant, quantize_all=True, quantize_group=group)
    assert m.native_reason is None, m.native_reason
    got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    want, _ = one_by_one(m, PROMPT)
    assert torch.equal(got, want), maxdiff(got, want)
    t = load(ckpt("qwen2_moe_wide"), quantize=quant, quantize_all=True, quantize_group=group, native=False)
    assert maxdiff(got, t.step([(t.new_sequence(), PROMPT)], all_logits=True)) <= 1e-4


@pytest.mark.parametrize("name", ["qwen3moe-q8_0", "qwen3moe-kquant", "qwen3moe-legacy", "qwen3moe-mxfp4"])
def test_gguf_formats(lib, name):
    pytest.importorskip("gguf")
    m = moetier.load(GGUF / f"{name}.gguf", tokenizer=False)
    assert m.native_reason is None, m.native_reason
    prompt = [p % m.spec.vocab_size for p in PROMPT]
    got = m.step([(m.new_sequence(), prompt)], all_logits=True)
    want, _ = one_by_one(m, prompt)
    assert torch.equal(got, want), maxdiff(got, want)


@pytest.mark.parametrize("isa", native.ISAS)
def test_gguf_tiles_every_isa(lib, isa):
    """q4_k / q6_k (the k-quant file) and q8_0 experts through the multi-token tiles of each ISA
    (tokens grouped by expert): a prefill is the single steps, bit for bit."""
    pytest.importorskip("gguf")
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")
    native.set_isa(isa)
    try:
        for name in ("qwen3moe-kquant", "qwen3moe-q8_0"):
            m = moetier.load(GGUF / f"{name}.gguf", tokenizer=False)
            prompt = [p % m.spec.vocab_size for p in PROMPT]
            got = m.step([(m.new_sequence(), prompt)], all_logits=True)
            want, _ = one_by_one(m, prompt)
            assert torch.equal(got, want), (name, isa, maxdiff(got, want))
    finally:
        native.set_isa(None)


# ----------------------------------------------------------------------------------------
# 6. every family has the multi-token path


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "gpt_oss", "llama4"])
def test_every_family_prefills_natively(lib, ckpt, family):
    m = load(ckpt(family))
    assert m.native_reason is None, m.native_reason
    assert hasattr(m.net.native, "step_many")
    m.step([(m.new_sequence(), PROMPT[:5])])
    p = m.compute_paths()
    assert {k: v["path"] for k, v in p.items()} == {"decode": "native", "prefill": "native", "batch": "native"}
    assert p["prefill"]["steps"] == 1


def test_bad_batches_refused(lib, ckpt):
    m = load(ckpt("qwen3_moe_mlp_only"))
    s = m.new_sequence()
    with pytest.raises(ValueError, match="twice"):
        m.net([(s, torch.tensor([1, 2])), (s, torch.tensor([3]))])
    with pytest.raises(ValueError, match="at least one"):
        m.net([(s, torch.tensor([1, 2])), (m.new_sequence(), torch.tensor([], dtype=torch.long))])
    assert s.length == 0  # nothing advanced
