"""Native multi-token steps of the extended decoders (moetier/native/ext_prefill.py, csrc/ext_many.c):
prefill and batched steps of gpt-oss (sinks, alternating sliding window, clamped SwiGLU with biases,
top-k-then-softmax router) and Llama-4 (chunked RoPE / NoPE layers, sigmoid top-1 router on the
expert input, shared expert, dense layers).

- float32: a 40-token native prefill (longer than every sliding window / attention chunk) and 16
  greedy steps agree with the torch path within 1e-4 (max |logit difference|), same greedy tokens;
- a prefill (all logits) is bit for bit the same tokens stepped one at a time natively, float32 and
  bfloat16, the KV written in place included; every sequence of a batched step (mixed prefill
  chunks and single tokens, different lengths) is bit for bit that sequence stepped alone;
- results do not depend on the thread count, the ISA, the expert provider (per-expert calls,
  a recycled slot, a tiered cache) or the weight format (gpt-oss MXFP4 experts, GGUF files);
- ``Model.compute_paths()`` reports native decode, prefill and batch steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tests.helpers.moe_families  # noqa: F401  (registers the gpt_oss / llama4 recipes)
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

PROMPT = torch.randint(2, 250, (40,), generator=torch.Generator().manual_seed(16)).tolist()
STEPS = 16

CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt_oss": ("gpt_oss", {}),  # sliding window 8 on alternating layers, YaRN rope, biases, top-2 of 8
    "gpt_oss_w3_top3": ("gpt_oss", dict(sliding_window=3, num_experts_per_tok=3, num_hidden_layers=3)),
    "llama4": ("llama4", {}),  # RoPE + chunk 8 + L2 q/k norm / NoPE + temperature; all MoE, top-1, shared
    "llama4_dense_top2": ("llama4", dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False,
                                         attention_chunk_size=5, no_rope_layer_interval=3)),
}
FAMILIES = ["gpt_oss", "llama4"]


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

ckpt = ckpt_fixture(CONFIGS)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    from tests.helpers.quantized import make_quantized_checkpoint

    return make_quantized_checkpoint(tmp_path_factory.mktemp("mxfp4"), "gpt_oss", "mxfp4", tokenizer=False,
                                     num_hidden_layers=2)


# ----------------------------------------------------------------------------------------
# 1. float32 vs the torch path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_prefill_matches_torch(lib, ckpt, name):
    from moetier.native.gpt_oss import ExtDecoder

    m, t = load(ckpt(name), dtype="float32"), load(ckpt(name), dtype="float32", native=False)
    assert m.native_reason is None and isinstance(m.net.native, ExtDecoder)
    descs = m.net.native.descs
    # the masks matter: the prompt is longer than every window / chunk
    assert any(d.window or d.chunk for d in descs) and all(max(d.window, d.chunk) < len(PROMPT) for d in descs)
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


@pytest.mark.parametrize("name", list(CONFIGS))
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
    # a prompt continued in chunks gives the same rows again
    s = m.new_sequence()
    parts = [m.step([(s, PROMPT[a:b])], all_logits=True) for a, b in ((0, 11), (11, 12), (12, 40))]
    assert torch.equal(torch.cat(parts), want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_steps_equal_one_by_one(lib, ckpt, family, dtype):
    """Five sequences with different histories, one flat batch mixing prefill chunks and single
    tokens, then batched decode steps: every row equals that sequence stepped alone."""
    m = load(ckpt(family), dtype=dtype)
    calls = count_many(m)
    prompts = [PROMPT[: 3 + 8 * i] for i in range(5)]
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
    paths = m.compute_paths()
    assert paths["batch"] == {"path": "native", "reason": None, "steps": 5}
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


@pytest.mark.parametrize("family", FAMILIES)
def test_long_batches_split_into_calls(lib, ckpt, monkeypatch, family):
    """Batches above MAX_CALL_TOKENS run as several calls (bounded scratch): the same bits."""
    from moetier.native import prefill

    m = load(ckpt(family))
    a0, b0 = m.new_sequence(), m.new_sequence()
    m.step([(a0, PROMPT[:5])])
    want = m.step([(a0, PROMPT[5:25]), (b0, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=True)
    monkeypatch.setattr(prefill, "MAX_CALL_TOKENS", 7)
    a, b = m.new_sequence(), m.new_sequence()
    m.step([(a, PROMPT[:5])])
    got = m.step([(a, PROMPT[5:25]), (b, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=True)
    assert got.shape == want.shape == (34, m.spec.vocab_size)
    assert torch.equal(got, want)
    assert a.length == 25 and b.length == 13 and same_kv(kv(a), kv(a0)) and same_kv(kv(b), kv(b0))


# ----------------------------------------------------------------------------------------
# 3. thread count, ISA


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_bit_identical(lib, ckpt, family, dtype):
    """160 tokens: every product, the attention and the head really split over threads."""
    m = load(ckpt(family), dtype=dtype)
    prompt = torch.randint(2, 250, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    before = torch.get_num_threads()
    runs = {}
    try:
        for nth in (1, 2, 3):
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
@pytest.mark.parametrize("family", FAMILIES)
def test_every_isa(lib, ckpt, isa, family):
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa} (supported: {', '.join(native.isas_supported())})")
    native.set_isa(isa)
    try:
        assert native.isa() == isa
        for dtype in ("float32", "bfloat16"):
            m = load(ckpt(family), dtype=dtype)
            got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
            want, _ = one_by_one(m, PROMPT)
            assert torch.equal(got, want), (isa, dtype, maxdiff(got, want))
            if dtype == "float32":
                t = load(ckpt(family), dtype=dtype, native=False)
                assert maxdiff(got, t.step([(t.new_sequence(), PROMPT)], all_logits=True)) <= 1e-4
    finally:
        native.set_isa(None)


@pytest.mark.parametrize("isa", native.ISAS)
def test_mxfp4_every_isa(lib, mxfp4, isa):
    """MXFP4 experts (their own row kernels per ISA) through the multi-token products."""
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa} (supported: {', '.join(native.isas_supported())})")
    native.set_isa(isa)
    try:
        for dtype in ("float32", "bfloat16"):
            m = load(mxfp4, dtype=dtype)
            a, b = m.new_sequence(), m.new_sequence()
            got = m.step([(a, PROMPT)], all_logits=True)
            want, _ = one_by_one(m, PROMPT)
            assert torch.equal(got, want), (isa, dtype, maxdiff(got, want))
            m.step([(b, PROMPT[:9])])
            batch = m.step([(a, [3]), (b, [4])])
            assert torch.equal(batch[0], one_by_one(m, PROMPT + [3])[0][-1])
            assert torch.equal(batch[1], one_by_one(m, PROMPT[:9] + [4])[0][-1])
    finally:
        native.set_isa(None)


# ----------------------------------------------------------------------------------------
# 4. weight formats, providers, hooks and observers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_experts(lib, mxfp4, dtype):
    """gpt-oss's release layout (experts as MXFP4 blocks + scales, gate/up as interleaved row views)."""
    from moetier.quant import QTensor

    m = load(mxfp4, dtype=dtype)
    assert m.native_reason is None, m.native_reason
    ew = m.provider.get(0, 0)
    assert isinstance(ew.down, QTensor) and ew.down.fmt == "mxfp4"
    calls = count_many(m)
    got, toks = prefill_then_greedy(m, PROMPT, STEPS)
    assert calls == [len(PROMPT)]
    want, _ = one_by_one(m, PROMPT)
    assert torch.equal(got[: len(PROMPT)], want), maxdiff(got[: len(PROMPT)], want)
    if dtype == "float32":
        t = load(mxfp4, dtype=dtype, native=False)
        want_t, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
        assert maxdiff(got, want_t) <= 1e-4 and toks == toks_t
    tiered = load(mxfp4, dtype=dtype, policy="lru", cache_slots=2, prefetch=True)
    try:
        got_t, _ = prefill_then_greedy(tiered, PROMPT, STEPS)
        assert torch.equal(got_t, got), maxdiff(got_t, got)
        assert tiered.hierarchy_metrics.accesses > 0
    finally:
        tiered.hierarchy.close()


@pytest.mark.parametrize("name", ["gptoss-mxfp4", "gptoss-bf16"])
def test_gguf_gpt_oss(lib, name):
    """gpt-oss GGUF files (ggml MXFP4 experts, separate gate / up): the same bits as single steps."""
    pytest.importorskip("gguf")
    m = load(Path(__file__).resolve().parents[1] / "data" / "gguf" / f"{name}.gguf")
    assert m.native_reason is None, m.native_reason
    prompt = [p % m.spec.vocab_size for p in PROMPT]
    calls = count_many(m)
    got = m.step([(m.new_sequence(), prompt)], all_logits=True)
    assert calls == [len(prompt)]
    want, _ = one_by_one(m, prompt)
    assert torch.equal(got, want), maxdiff(got, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_providers_bit_identical(lib, ckpt, family, dtype):
    """One expert per native call (a provider without stable gets, one recycled slot) and a tiered
    cache of 2 slots give the in-RAM provider's bits, prefill, batches and steps."""
    path = ckpt(family)
    base = load(path, dtype=dtype)
    want, toks = prefill_then_greedy(base, PROMPT, 6)
    for cls in (DelegatingProvider, RecyclingProvider):
        m = load(path, dtype=dtype, expert_provider_factory=wrapped(cls))
        assert m.native_reason is None and not getattr(m.provider, "stable_gets", False)
        got, _ = prefill_then_greedy(m, PROMPT, 6)
        assert torch.equal(got, want), (cls.__name__, maxdiff(got, want))
        if cls is RecyclingProvider:
            assert m.provider.gets > 0
    tiered = load(path, dtype=dtype, policy="lru", cache_slots=2, prefetch=True)
    try:
        assert tiered.native_reason is None
        got, _ = prefill_then_greedy(tiered, PROMPT, 6)
        assert torch.equal(got, want), maxdiff(got, want)
        assert tiered.hierarchy_metrics.accesses > 0
    finally:
        tiered.hierarchy.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_observers_and_norm_hooks(lib, ckpt, family):
    """Router observers get [T, k] routings equal to the torch path's; the post-attention norm's
    pre-hooks (the hierarchy's router prefetch) get [T, H] in the model dtype; same logits."""
    path = ckpt(family)
    m, t = load(path), load(path, native=False)
    base = load(path)
    want = base.step([(base.new_sequence(), PROMPT)], all_logits=True)
    seen, seen_t, shapes = [], [], []
    m.add_router_observer(lambda layer, ids, w: seen.append((layer, ids, w)))
    t.add_router_observer(lambda layer, ids, w: seen_t.append((layer, ids, w)))
    m.net.layers[0].post_attention_layernorm.register_forward_pre_hook(lambda mod, args: shapes.append(args[0]))
    got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    t.step([(t.new_sequence(), PROMPT)])
    assert torch.equal(got, want)
    assert [s.shape for s in shapes] == [torch.Size([len(PROMPT), m.spec.hidden_size])]
    assert shapes[0].dtype == m.dtype
    assert [s[0] for s in seen] == sorted(m.net.moe_blocks()) == [s[0] for s in seen_t]
    k = m.net.native.descs[seen[0][0]].topk
    for (_, ia, wa), (_, ib, wb) in zip(seen, seen_t, strict=True):
        assert ia.shape == (len(PROMPT), k) and ia.dtype == torch.int64 and wa.dtype == m.dtype
        assert torch.equal(ia, ib) and maxdiff(wa, wb) < 1e-5


# ----------------------------------------------------------------------------------------
# 5. reported paths


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_paths_native(lib, ckpt, family):
    m = load(ckpt(family))
    a, b = m.new_sequence(), m.new_sequence()
    m.step([(a, PROMPT[:20])])  # prefill
    m.step([(a, [3])])  # decode
    m.step([(a, [4]), (b, [5])])  # batch
    p = m.compute_paths()
    for kind in ("decode", "prefill", "batch"):
        assert p[kind] == {"path": "native", "reason": None, "steps": 1}, (kind, p[kind])


def test_bad_batches_refused(lib, ckpt):
    m = load(ckpt("gpt_oss"))
    s = m.new_sequence()
    with pytest.raises(ValueError, match="twice"):
        m.net([(s, torch.tensor([1, 2])), (s, torch.tensor([3]))])
    with pytest.raises(ValueError, match="at least one"):
        m.net([(s, torch.tensor([1, 2])), (m.new_sequence(), torch.tensor([], dtype=torch.long))])
    assert s.length == 0  # nothing advanced
