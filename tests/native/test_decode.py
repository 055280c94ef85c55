"""Native single-token decode (moetier.native): agreement with the torch path, determinism, fallbacks.

The torch path (``native=False``) is the reference: in float32 a native step must give the same
greedy tokens and logits within 1e-5; in bfloat16 it must be closer to a float32 reference than
the torch bf16 path; results must not depend on the thread count or on the expert provider
(one ``mt_moe`` call for all experts vs one per expert); unsupported models, ``native=False``,
``MOETIER_NATIVE=0`` and a failing compiler fall back to the torch path.
"""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek/gpt_oss/llama4 recipes)
from moetier import native
from moetier.native.weights import describe
from tests.native.common import (
    DelegatingProvider,
    RecyclingProvider,
    ckpt_fixture,
    count_native,
    load,
    maxdiff,
    wrapped,
)

pytestmark = [pytest.mark.usefixtures("_native_on"),  # lib: tests/native/conftest.py
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]  # qwen2_moe without shared

ATOL, RTOL = 1e-5, 1e-6  # float32: |native - torch| <= 1e-5 + 1e-6 |logit| (tied-embedding logits reach ~40)
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]  # 8 tokens: the KV cache starts at 16 slots
STEPS = 14  # 8 + 14 = 22 positions: the cache grows (16 -> 32) during native steps

# name: (family, transformers config overrides)
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama_bias_tied": ("llama", dict(attention_bias=True, tie_word_embeddings=True)),
    "llama_mqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=1)),
    "mixtral_window": ("mixtral", dict(sliding_window=5)),
    "qwen2_moe_shared": ("qwen2_moe", {}),  # shared expert + sigmoid gate + qkv bias, norm_topk_prob=False
    "qwen2_moe_no_shared": ("qwen2_moe", dict(shared_expert_intermediate_size=0, norm_topk_prob=True,
                                              num_experts_per_tok=3)),
    "qwen3_moe_mlp_only": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3_moe_sparse_step": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=False)),
    "qwen3_moe_yarn": ("qwen3_moe", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                          "original_max_position_embeddings": 64},
                                         max_position_embeddings=256)),
    "olmoe_full_qknorm": ("olmoe", {}),
    "olmoe_norm_topk": ("olmoe", dict(norm_topk_prob=True, num_experts_per_tok=4)),
    # big enough that every kernel (q/k/v, experts, dense MLP, head; attention past ~190
    # positions) crosses PARALLEL_MIN_ELEMS and really splits over threads
    "qwen3_moe_wide": ("qwen3_moe", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                         moe_intermediate_size=128, num_experts_per_tok=4, vocab_size=512,
                                         intermediate_size=256, mlp_only_layers=[1])),
    "qwen2_moe_wide": ("qwen2_moe", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                                         moe_intermediate_size=96, num_experts_per_tok=4, vocab_size=512,
                                         shared_expert_intermediate_size=160)),
}

# what each config must exercise, read back from the native layer descriptors (per layer)
EXPECT: dict[str, dict[str, list]] = {
    "llama_bias_tied": dict(mlp=[0, 0], has_qkv_b=[True, True], has_o_b=[True, True], qk_norm=[0, 0]),
    "llama_mqa": dict(nkv=[1, 1], nh=[8, 8]),
    "mixtral_window": dict(window=[5, 5], mlp=[1, 1], norm_topk=[1, 1]),
    "qwen2_moe_shared": dict(mlp=[1, 1], SI=[48, 48], has_gate_gate=[True, True], has_qkv_b=[True, True],
                             has_o_b=[False, False], norm_topk=[0, 0], window=[0, 0]),
    "qwen2_moe_no_shared": dict(SI=[0, 0], has_gate_gate=[False, False], norm_topk=[1, 1], topk=[3, 3]),
    "qwen3_moe_mlp_only": dict(mlp=[1, 0, 1], qk_norm=[1, 1, 1], norm_topk=[1, 0, 1]),
    "qwen3_moe_sparse_step": dict(mlp=[0, 1, 0, 1], norm_topk=[0, 0, 0, 0]),
    "qwen3_moe_yarn": dict(mlp=[1, 1]),
    "olmoe_full_qknorm": dict(qk_norm=[2, 2], norm_topk=[0, 0]),
    "olmoe_norm_topk": dict(norm_topk=[1, 1], topk=[4, 4]),
}



# ----------------------------------------------------------------------------------------
# fixtures and helpers

ckpt = ckpt_fixture(CONFIGS)


def native_pair(path, dtype="float32", **kw):
    """(native model, torch-path model) of one checkpoint."""
    m, t = load(path, dtype=dtype, **kw), load(path, dtype=dtype, native=False, **kw)
    assert m.native_reason is None and m.net.native is not None, m.native_reason
    assert t.native_reason is not None and t.net.native is None
    return m, t


def kv_capacity(seq) -> int:
    return seq.layers[0][0].shape[1]


def greedy(model, prompt, steps, capacity=0):
    """Prefill ``prompt`` (if any), then ``steps`` greedy single-token steps.

    Returns (logits [steps + 1, V] (or [steps, V] without a prompt), tokens, KV capacity after each call)."""
    seq = model.new_sequence(capacity)
    logits, toks, caps = [], [], []
    if prompt:
        logits.append(model.step([(seq, prompt)])[0])
        caps.append(kv_capacity(seq))
    tok = PROMPT[0]
    for _ in range(steps):
        if logits:
            tok = int(logits[-1].argmax())
        toks.append(tok)
        logits.append(model.step([(seq, [tok])])[0])
        caps.append(kv_capacity(seq))
    assert seq.length == len(prompt) + steps
    return torch.stack(logits), toks, caps


def forced(model, prompt, tokens, capacity=0):
    """Prefill ``prompt``, then feed ``tokens`` one at a time; logits [1 + len(tokens), V]."""
    seq = model.new_sequence(capacity)
    out = [model.step([(seq, prompt)])[0]]
    for t in tokens:
        out.append(model.step([(seq, [t])])[0])
    return torch.stack(out)


def close(got, want) -> bool:
    """float32 agreement: every element within ATOL + RTOL * |want|."""
    return got.shape == want.shape and bool(((got - want).abs() <= ATOL + RTOL * want.abs()).all())


def desc_values(model, field: str) -> list:
    descs = model.net.native.descs
    if field.startswith("has_"):
        f = {"has_qkv_b": "qkv_b", "has_o_b": "o_b", "has_gate_gate": "s_gate_gate"}[field]
        return [bool(getattr(d, f)) for d in descs]
    return [getattr(d, field) for d in descs]


# ----------------------------------------------------------------------------------------
# 1. float32: native == torch path (logits within 1e-5, same greedy tokens)


@pytest.mark.parametrize("name", list(EXPECT))
def test_f32_native_matches_torch(lib, ckpt, name):
    m, t = native_pair(ckpt(name))
    for field, want in EXPECT[name].items():
        assert desc_values(m, field) == want, (name, field)
    calls = count_native(m)
    got, toks, caps = greedy(m, PROMPT, STEPS)
    want, toks_t, caps_t = greedy(t, PROMPT, STEPS)
    assert len(calls) == STEPS  # every single-token step (and only those) ran natively
    assert got.dtype == torch.float32 and got.shape == want.shape == (STEPS + 1, m.spec.vocab_size)
    assert close(got[0], want[0])  # the prefill runs natively too (tests/native/test_prefill.py)
    assert torch.isfinite(got).all()
    assert close(got, want), f"{name}: max |native - torch| {maxdiff(got, want):.3g}"
    assert toks == toks_t
    # the KV cache grew during native decode (and the same way as on the torch path)
    assert caps[0] == 16 and caps[-1] == 32 and caps == caps_t
    # greedy runs of random tiny models can repeat one token (tied embeddings echo): also
    # feed varied tokens
    varied = torch.randint(0, m.spec.vocab_size, (STEPS,), generator=torch.Generator().manual_seed(7)).tolist()
    got, want = forced(m, PROMPT, varied), forced(t, PROMPT, varied)
    assert close(got, want), f"{name} (varied tokens): max |native - torch| {maxdiff(got, want):.3g}"


def test_mixtral_window_cuts(lib, ckpt):
    """The sliding window really matters here: with the native window switched off the logits
    leave the torch path's (so the agreement above checks the window)."""
    m, t = native_pair(ckpt("mixtral_window"))
    want, toks, _ = greedy(t, PROMPT, STEPS)
    assert len(PROMPT) + STEPS > 2 * 5
    assert close(forced(m, PROMPT, toks), want)
    for d in m.net.native.descs:
        d.window = 0
    assert maxdiff(forced(m, PROMPT, toks), want) > 1e-3


@pytest.mark.parametrize("name", ["qwen2_moe_shared", "olmoe_full_qknorm", "llama_mqa"])
def test_f32_from_first_token(lib, ckpt, name):
    """No prefill: the very first token (empty cache) is native, and the cache grows twice
    (16 -> 32 -> 64) under native steps only."""
    m, t = native_pair(ckpt(name))
    calls = count_native(m)
    got, toks, caps = greedy(m, [], 40)
    want, toks_t, _ = greedy(t, [], 40)
    assert len(calls) == 40
    assert close(got, want)
    assert toks == toks_t
    assert caps[0] == 16 and 32 in caps and caps[-1] == 64


def test_f32_preallocated_cache_and_generate(lib, ckpt):
    path = ckpt("qwen3_moe_mlp_only")
    m, t = native_pair(path)
    got, toks, caps = greedy(m, PROMPT, STEPS, capacity=100)
    want, toks_t, _ = greedy(t, PROMPT, STEPS, capacity=100)
    assert set(caps) == {100}
    assert close(got, want) and toks == toks_t
    assert m.generate_ids(PROMPT, 12).ids == t.generate_ids(PROMPT, 12).ids
    m.warmup()
    assert m.logits([7]).shape == (1, m.spec.vocab_size)  # a 1-token prompt goes natively too
    assert close(m.logits([7]), t.logits([7]))


def test_f32_rope_table_grows(lib, ckpt):
    """Positions past the first rope table (256 rows): the native decoder's own table grows."""
    m, t = native_pair(ckpt("qwen3_moe_yarn"))
    prompt = torch.randint(0, 300, (254,), generator=torch.Generator().manual_seed(1)).tolist()
    got, toks, _ = greedy(m, prompt, 6)
    want, toks_t, _ = greedy(t, prompt, 6)
    assert close(got, want) and toks == toks_t


# ----------------------------------------------------------------------------------------
# 2. bfloat16: float32 activations make native steps closer to a float32 reference


@pytest.mark.parametrize("name", ["qwen3_moe_mlp_only", "qwen2_moe_shared", "olmoe_full_qknorm"])
def test_bf16_closer_to_f32_than_torch_bf16(lib, ckpt, name):
    path = ckpt(name)
    ref = load(path, dtype="float32", native=False)
    want, toks, _ = greedy(ref, PROMPT, 16)
    m, t = native_pair(path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    calls = count_native(m)
    got_n = forced(m, PROMPT, toks)
    got_t = forced(t, PROMPT, toks)
    assert len(calls) == 16
    assert torch.isfinite(got_n).all()
    err_n = (got_n - want).abs().amax(dim=1)  # row 0: the prefill, native too
    err_t = (got_t - want).abs().amax(dim=1)
    assert err_n.mean() < err_t.mean(), (err_n.mean().item(), err_t.mean().item())
    assert (err_n < err_t).float().mean() >= 0.75, (err_n, err_t)  # closer at most positions
    # a near-tie routing flip from the bf16 weights (both paths, same position) can reach ~0.15;
    # apart from it native stays within a few 1e-2 on these logits (|logit| ~ 4)
    assert err_n.max() <= 1.05 * err_t.max(), (err_n.max().item(), err_t.max().item())
    assert err_n.median() < 0.05


def test_bf16_kv_rows_round_to_nearest(lib, ckpt):
    """Layer 0's k/v do not depend on the cache. The bf16 model computes them natively in float32
    from bf16 weights and x rounded to bf16 (the bf16 product rule); the float32 torch path with
    the same weights and its k/v projections' input rounded to bf16 computes the same values (up
    to summation order), so the bf16 model's cache rows must be those rounded to nearest-even
    (like torch), not truncated."""
    path = ckpt("qwen3_moe_mlp_only", dtype=torch.bfloat16)
    toks = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128, 33, 8]
    m = load(path, dtype="bfloat16")
    t = load(path, dtype="float32", native=False)
    assert m.native_reason is None
    from moetier.layers.attention import Attention

    hooked = [mod for mod in t.net.modules() if isinstance(mod, Attention)]  # its input x: the q/k/v products' input
    assert hooked
    for mod in hooked:
        mod.register_forward_pre_hook(lambda _mod, args: (args[0].bfloat16().float(), *args[1:]))
    caches = {}
    for name, model in (("bfloat16", m), ("float32", t)):
        seq = model.new_sequence()
        for tok in toks:
            model.step([(seq, [tok])])
        caches[name] = [c[:, : len(toks)] for c in seq.layers[0]]
    for b, f in zip(caches["bfloat16"], caches["float32"], strict=True):
        assert b.dtype == torch.bfloat16 and f.dtype == torch.float32
        same = (b == f.to(torch.bfloat16)).float().mean().item()
        truncated = (b == (f.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)).float().mean()
        assert same >= 0.99, f"only {same:.1%} of the bf16 cache entries are the rounded float32 values"
        assert truncated < 0.9, truncated  # the check tells nearest from truncation


# ----------------------------------------------------------------------------------------
# 3. thread-count independence (bit-identical)


@pytest.mark.parametrize("name", ["qwen3_moe_wide", "qwen2_moe_wide"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_bit_identical(lib, ckpt, name, dtype):
    """What the native decode promises: from the same state, its steps give the same bits at
    any thread count (each output row is computed whole by one thread). The prefill runs once
    and every thread count decodes from a copy of that one state (the native prefill's own
    thread-count independence: tests/native/test_prefill.py). Thread counts above the core
    count (16 on a 2-core machine) must hold too: CI machines vary."""
    m = load(ckpt(name), dtype=dtype)
    assert m.native_reason is None
    calls = count_native(m)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    base = m.new_sequence()
    first = m.step([(base, prompt)])[0]  # prefill at the ambient thread count
    assert not calls
    before = torch.get_num_threads()
    runs = {}
    try:
        for nth in (1, 2, 3, 16):
            torch.set_num_threads(nth)
            seq = copy.deepcopy(base)
            logits, toks = [], []
            tok = int(first.argmax())
            for _ in range(6):
                toks.append(tok)
                logits.append(m.step([(seq, [tok])])[0])
                tok = int(logits[-1].argmax())
            runs[nth] = (torch.stack(logits), toks, [[c[:, : seq.length].clone() for c in kv] for kv in seq.layers])
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert len(calls) == 6 * len(runs)  # every compared step ran natively
    for nth, (logits, toks, kv) in runs.items():
        assert torch.equal(logits, runs[1][0]), f"{nth} threads != 1 thread: max diff {maxdiff(logits, runs[1][0]):.3g}"
        assert toks == runs[1][1]
        for layer, (got, want) in enumerate(zip(kv, runs[1][2], strict=True)):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), f"layer {layer} KV, {nth} threads"
    if dtype == "float32":  # the threaded attention / gemv splits are also right
        want, toks, _ = greedy(load(ckpt(name), native=False), prompt, 6)
        got = torch.cat([first[None], runs[1][0]])
        assert close(got, want), maxdiff(got, want)
        assert runs[1][1] == toks


# ----------------------------------------------------------------------------------------
# 4. per-expert calls (providers without stable_gets) == one call for all experts


@pytest.mark.parametrize("name", ["qwen2_moe_shared", "qwen3_moe_mlp_only", "mixtral_window"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_expert_path_bit_identical(lib, ckpt, name, dtype):
    path = ckpt(name)
    base = load(path, dtype=dtype)
    assert getattr(base.provider, "stable_gets", False)
    want, toks, _ = greedy(base, PROMPT, 10)
    for cls in (DelegatingProvider, RecyclingProvider):
        m = load(path, dtype=dtype, expert_provider_factory=wrapped(cls))
        assert m.native_reason is None and not getattr(m.provider, "stable_gets", False)
        calls = count_native(m)
        got, toks_p, _ = greedy(m, PROMPT, 10)
        assert len(calls) == 10
        assert torch.equal(got, want), (cls.__name__, maxdiff(got, want))
        assert toks_p == toks
    # the recycled slot is a real hazard: claiming stable gets for it (all experts in one call,
    # every pointer on the same slot) changes the result, so the per-expert path is what saves it
    m = load(path, dtype=dtype, expert_provider_factory=wrapped(RecyclingProvider))
    m.provider.stable_gets = True
    assert not torch.equal(forced(m, PROMPT, toks), want)


@pytest.mark.parametrize("name", ["qwen2_moe_shared", "qwen3_moe_mlp_only", "olmoe_full_qknorm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_step_path_bit_identical(lib, ckpt, name, dtype):
    """In-RAM experts, no observer: one native call for all layers (``mt_layers``); a no-op
    router observer forces the per-layer Python-driven path. Same bits, and the whole-step
    path is really taken (its expert tables get built) only without the observer."""
    path = ckpt(name)
    fast = load(path, dtype=dtype)
    want, toks, _ = greedy(fast, PROMPT, 10)
    assert fast.net.native.table_for is fast.provider
    slow = load(path, dtype=dtype)
    slow.add_router_observer(lambda layer, ids, w: None)
    got, toks_s, _ = greedy(slow, PROMPT, 10)
    assert slow.net.native.table_for is None
    assert torch.equal(got, want), maxdiff(got, want)
    assert toks_s == toks


@pytest.mark.parametrize("prefetch", [False, True])
def test_tiered_provider_bit_identical(lib, ckpt, prefetch):
    path = ckpt("qwen2_moe_shared")
    for dtype in ("float32", "bfloat16"):
        want, toks, _ = greedy(load(path, dtype=dtype), PROMPT, 10)
        m = moetier.load(path, tokenizer=False, dtype=dtype, policy="lru", cache_slots=2, prefetch=prefetch)
        try:
            assert m.native_reason is None and not getattr(m.provider, "stable_gets", False)
            calls = count_native(m)
            got, toks_p, _ = greedy(m, PROMPT, 10)
            assert len(calls) == 10
            assert torch.equal(got, want), (dtype, maxdiff(got, want))
            assert toks_p == toks
            assert m.hierarchy_metrics.accesses > 0
        finally:
            m.hierarchy.close()


# ----------------------------------------------------------------------------------------
# 5. unsupported models and switches: torch path, with a reason


def test_llama_mlp_bias_unsupported(lib, ckpt):
    m = load(ckpt("llama_bias_tied", mlp_bias=True))
    assert m.net.native is None and "dense MLP" in m.native_reason
    assert torch.isfinite(greedy(m, PROMPT, 2)[0]).all()


def test_native_false(lib, ckpt):
    m = load(ckpt("qwen3_moe_mlp_only"), native=False)
    assert m.net.native is None and m.native_reason and "native=False" in m.native_reason


@pytest.mark.parametrize("value", ["0", "off"])
def test_env_disables(lib, ckpt, monkeypatch, value):
    path = ckpt("qwen3_moe_mlp_only")
    monkeypatch.setenv("MOETIER_NATIVE", value)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is None
    assert native.unavailable_reason() == "disabled by MOETIER_NATIVE=0"
    m = load(path)
    assert m.net.native is None and m.native_reason == "disabled by MOETIER_NATIVE=0"
    want = greedy(m, PROMPT, 3)[0]
    # the cached library does not override the switch either
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", lib)
    assert native.library() is None and load(path).net.native is None
    monkeypatch.delenv("MOETIER_NATIVE")
    m = load(path)
    assert m.native_reason is None and m.net.native is not None
    assert close(greedy(m, PROMPT, 3)[0], want)


# ----------------------------------------------------------------------------------------
# 6. build failures and the build cache


def _reset(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("MOETIER_CACHE_DIR", str(tmp_path))


def test_failing_compiler_falls_back(lib, ckpt, monkeypatch, tmp_path):
    path = ckpt("qwen3_moe_mlp_only")
    want = greedy(load(path, native=False), PROMPT, 4)[0]
    _reset(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "false")
    assert native.library() is None
    reason = native.unavailable_reason()
    assert reason and "false failed" in reason and "unavailable" in reason
    assert not list((tmp_path / "native").glob("*.so"))  # no half-built library left behind
    assert native.library() is None  # cached: no second attempt
    m = load(path)
    assert m.net.native is None and m.native_reason == reason
    assert torch.equal(greedy(m, PROMPT, 4)[0], want)


def test_no_compiler(lib, monkeypatch, tmp_path):
    _reset(monkeypatch, tmp_path)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert native.library() is None
    assert "no C compiler" in native.unavailable_reason()


def test_build_is_cached(lib, monkeypatch, tmp_path):
    _reset(monkeypatch, tmp_path)
    first = native.library()
    assert first is not None, native.unavailable_reason()
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is not None
    assert list((tmp_path / "native").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------
# 7. the GEMV kernel against a float64 reference


def _gemv(lib, W, b, x, rows, cols, nth, pad=64):
    """Run mt_gemv with NaN past the ends of W and x and sentinels past y (out-of-bounds
    reads poison the result, out-of-bounds writes change the sentinels)."""
    dt = {torch.float32: 0, torch.bfloat16: 1}[W.dtype]
    wbuf = torch.full((rows * cols + pad,), float("nan"), dtype=W.dtype)
    wbuf[: rows * cols] = W.reshape(-1)
    xbuf = torch.full((cols + pad,), float("nan"))
    xbuf[:cols] = x
    bbuf = None
    if b is not None:
        bbuf = torch.full((rows + pad,), float("nan"), dtype=W.dtype)
        bbuf[:rows] = b
    ybuf = torch.full((rows + 16,), float("nan"))
    ybuf[rows:] = 12345.0
    desc = describe(wbuf[: rows * cols].view(rows, cols))
    lib.mt_gemv(ctypes.byref(desc), None if bbuf is None else bbuf.data_ptr(), dt, xbuf.data_ptr(), ybuf.data_ptr(),
                nth)
    assert (ybuf[rows:] == 12345.0).all(), "wrote past y"
    return ybuf[:rows].clone()


GEMV_COLS = (1, 31, 33, 63, 65, 100, 384)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_awkward_shapes(lib, dtype, bias):
    gen = torch.Generator().manual_seed(3)
    for cols in GEMV_COLS:
        for rows in range(1, 14):
            W = torch.randn(rows, cols, generator=gen).to(dtype)
            x = torch.randn(cols, generator=gen)
            b = (0.5 * torch.randn(rows, generator=gen)).to(dtype) if bias else None
            xr = x.to(dtype).double()  # bf16 weights take x rounded to bf16
            ref = W.double() @ xr + (b.double() if bias else 0.0)
            mag = W.double().abs() @ xr.abs() + (b.double().abs() if bias else 0.0)
            y1 = _gemv(lib, W, b, x, rows, cols, 1)
            y2 = _gemv(lib, W, b, x, rows, cols, 2)
            assert torch.isfinite(y1).all(), (rows, cols)
            err = ((y1.double() - ref).abs() / mag.clamp_min(1e-30)).max().item()
            assert err <= 1e-5, (rows, cols, err)
            assert torch.equal(y1, y2), (rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(257, 385), (1000, 64), (61, 1031), (1, 65537)])
def test_gemv_threaded_split(lib, dtype, shape):
    """Shapes big enough to run in parallel: same bits for 1, 2, 3 and 5 threads."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(rows, cols, generator=gen).to(dtype)
    x = torch.randn(cols, generator=gen)
    b = torch.randn(rows, generator=gen).to(dtype)
    xr = x.to(dtype).double()  # bf16 weights take x rounded to bf16
    ref = W.double() @ xr + b.double()
    mag = W.double().abs() @ xr.abs() + b.double().abs()
    ys = {n: _gemv(lib, W, b, x, rows, cols, n) for n in (1, 2, 3, 5)}
    assert ((ys[1].double() - ref).abs() / mag).max().item() <= 1e-5
    for n in (2, 3, 5):
        assert torch.equal(ys[n], ys[1]), n


# ----------------------------------------------------------------------------------------
# 8. hooks: router observers and the post-attention-norm pre-hooks (router prefetch)


@pytest.mark.parametrize("name", ["qwen3_moe_mlp_only", "qwen2_moe_shared", "olmoe_norm_topk"])
def test_router_observers(lib, ckpt, name):
    m, t = native_pair(ckpt(name))
    moe_layers = list(m.spec.moe_layer_ids)
    k = m.spec.top_k
    seen = {}
    for model in (m, t):
        log: list = []
        model.add_router_observer(lambda layer, ids, w, log=log: log.append((layer, ids.clone(), w.clone())))
        seq = model.new_sequence()
        model.step([(seq, PROMPT)])
        log.clear()
        tok = 9
        for _ in range(6):
            tok = int(model.step([(seq, [tok])])[0].argmax())
        seen[model is m] = log
    native_log, torch_log = seen[True], seen[False]
    assert [layer for layer, _, _ in native_log] == moe_layers * 6
    for (layer, ids, w), (layer_t, ids_t, w_t) in zip(native_log, torch_log, strict=True):
        assert layer == layer_t
        assert ids.dtype == torch.int64 and ids.shape == (1, k)
        assert w.dtype == torch.float32 and w.shape == (1, k)
        assert torch.equal(ids, ids_t), (layer, ids, ids_t)
        assert close(w, w_t)
        assert (w[0, :-1] >= w[0, 1:]).all()  # descending, like torch.topk
        if m.spec.norm_topk_prob:
            assert abs(w.sum().item() - 1.0) <= 1e-5


def test_router_ties_go_to_the_lower_id(lib, ckpt):
    """Equal router scores (all router rows the same): the native top-k takes the lowest ids, in
    order, with equal weights."""
    m = load(ckpt("qwen3_moe_mlp_only"))
    with torch.no_grad():
        for block in m.net.moe_blocks().values():
            w = block.gate.weight
            w.copy_(w[3].clone().expand_as(w))
    log: list = []
    m.add_router_observer(lambda layer, ids, w: log.append((layer, ids, w)))
    seq = m.new_sequence()
    for t in (5, 17, 42):
        assert torch.isfinite(m.step([(seq, [t])])).all()
    assert [layer for layer, _, _ in log] == [0, 2] * 3
    for _, ids, w in log:
        assert ids.tolist() == [[0, 1]]
        assert w.tolist() == [[0.5, 0.5]]  # softmax 1/8 each, renormalised over the top 2


def test_post_attention_norm_prehooks(lib, ckpt):
    m, t = native_pair(ckpt("qwen3_moe_mlp_only"))
    got = {}
    for model in (m, t):
        log: list = []
        handles = [layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, i=i, log=log: log.append((i, args[0].clone())))
            for i, layer in enumerate(model.net.layers)]
        seq = model.new_sequence()
        model.step([(seq, PROMPT)])
        log.clear()
        for tok in (3, 60, 9):
            model.step([(seq, [tok])])
        for h in handles:
            h.remove()
        got[model is m] = log
    assert [i for i, _ in got[True]] == [0, 1, 2] * 3
    for (_, h), (_, h_t) in zip(got[True], got[False], strict=True):
        assert h.shape == h_t.shape == (1, m.spec.hidden_size) and h.dtype == torch.float32
        assert close(h, h_t)


# ----------------------------------------------------------------------------------------
# 9. mixing native steps with torch prefill, multi-token and batched steps on one cache


@pytest.mark.parametrize("name", ["qwen2_moe_shared", "mixtral_window", "olmoe_full_qknorm"])
def test_mixed_paths_share_the_cache(lib, ckpt, name):
    m, t = native_pair(ckpt(name))
    gen = torch.Generator().manual_seed(5)
    toks = torch.randint(0, 300, (40,), generator=gen).tolist()
    # (kind, n tokens): prefill 6 (torch) -> 8 native -> 5-token step (torch; the cache grows
    # past 16 and must keep the native-written rows) -> native -> a 2-sequence batch (torch) -> native
    plan = [("multi", 6), ("one", 8), ("multi", 5), ("one", 4), ("batch", 1), ("one", 4), ("multi", 3), ("one", 3)]
    results = {}
    for model in (m, t):
        calls = count_native(model) if model is m else None
        seq, other = model.new_sequence(), model.new_sequence()
        model.step([(other, toks[:3])])
        out, i = [], 0
        for kind, n in plan:
            if kind == "multi":
                out.append(model.step([(seq, toks[i:i + n])], all_logits=True))
                i += n
            elif kind == "batch":
                out.append(model.step([(seq, toks[i:i + 1]), (other, [toks[-1]])])[:1])
                i += 1
            else:
                for _ in range(n):
                    out.append(model.step([(seq, [toks[i]])]))
                    i += 1
        assert seq.length == i == sum(n for _, n in plan)
        results[model is m] = torch.cat(out)
        if calls is not None:
            assert len(calls) == sum(n for kind, n in plan if kind == "one")
    got, want = results[True], results[False]
    assert got.shape == want.shape
    assert close(got, want)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_two_native_models_interleaved(lib, ckpt):
    """Decoders share the library's thread pool and split buffer but not their state:
    interleaving two models' steps gives the same bits as running each alone."""
    paths = [ckpt("qwen2_moe_shared"), ckpt("olmoe_full_qknorm")]
    alone = [greedy(load(p), PROMPT, 8)[0] for p in paths]
    models = [load(p) for p in paths]
    seqs = [m.new_sequence() for m in models]
    outs: list[list] = [[], []]
    for j, (m, s) in enumerate(zip(models, seqs, strict=True)):
        outs[j].append(m.step([(s, PROMPT)])[0])
    for _ in range(8):
        for j, (m, s) in enumerate(zip(models, seqs, strict=True)):
            outs[j].append(m.step([(s, [int(outs[j][-1].argmax())])])[0])
    for j in range(2):
        assert torch.equal(torch.stack(outs[j]), alone[j])


def _child_steps(model, conn):
    try:
        conn.send(greedy(model, [], 4)[0].tolist())  # native steps only: no torch parallel region
    except BaseException as e:  # report, never hang the parent
        conn.send(repr(e))


def test_forked_child_decodes(lib, ckpt):
    """After the pool's workers exist, a forked child (which has none of them) must start its
    own instead of waiting forever for the parent's threads. (The child runs only native steps:
    torch's own OpenMP pool is not fork-safe.)"""
    import multiprocessing as mp

    m = load(ckpt("qwen3_moe_wide"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = greedy(m, [], 4)[0]  # 2-thread parallel regions: the parent's workers now exist
        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child_steps, args=(m, send))
        p.start()
        try:
            assert recv.poll(30), "forked child did not finish its native steps (thread pool deadlock?)"
            got = recv.recv()
        finally:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        torch.set_num_threads(before)
    assert isinstance(got, list), got
    assert torch.equal(torch.tensor(got), want)
