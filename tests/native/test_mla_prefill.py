"""Native multi-token steps of the DeepSeek MLA decoder (moetier/native/mla_prefill.py,
csrc/mla_many.c) on the tiny checkpoints of test_mla.py (q_lora None / set, softmax greedy /
group_limited_greedy / noaux_tc routing, dense-first layers, shared experts or none, YaRN,
interleaved / half rope, attention biases):

- in the absorbed form (``mla_prefill.PLAIN = False``) a prefill (all logits) is bit for bit the
  same tokens stepped one at a time natively (float32 and bfloat16), latent cache included; the
  plain (decompressed) form a prompt takes by default is within float rounding of that (and not
  the same bits: it really ran); every sequence of a batched step (mixed prefill chunks and single
  tokens) equals that sequence stepped alone (single tokens always take the absorbed form);
- float32: a 40-token native prefill and 16 greedy steps agree with the torch path within 1e-4,
  same greedy tokens;
- results (either form) do not depend on the thread count, how a batch is split into calls, the
  ISA, the expert provider (per-expert calls,
  recycled slots, tiered cache) or the weight format (experts / every linear quantized at load);
- compute_paths reports native decode, prefill and batch.
"""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers the deepseek recipes)
from moetier import native
from tests.native.common import (
    DelegatingProvider,
    RecyclingProvider,
    ckpt_fixture,
    count_many,
    latent_kv,
    maxdiff,
    one_by_one,
    prefill_then_greedy,
    same_kv,
    wrapped,
)
from tests.native.common import load as _load
from tests.native.test_mla import CONFIGS

PROMPT = torch.randint(2, 250, (40,), generator=torch.Generator().manual_seed(5)).tolist()
STEPS = 16


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

ckpt = ckpt_fixture(CONFIGS)
kv = latent_kv


def load(path, **kw):
    m = _load(path, **kw)
    assert m.native_reason is None, m.native_reason
    return m


# ----------------------------------------------------------------------------------------
# 1. bit-identical to single-token steps


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_is_single_steps(lib, ckpt, absorbed, name, dtype):
    from moetier.native.mla_prefill import MLAManyStepper

    m = load(ckpt(name), dtype=dtype)
    calls = count_many(m)
    seq = m.new_sequence()
    got = m.step([(seq, PROMPT)], all_logits=True)
    assert calls == [len(PROMPT)] and isinstance(m.net.native.many, MLAManyStepper)
    want, ref = one_by_one(m, PROMPT)
    assert torch.equal(got, want), maxdiff(got, want)
    assert same_kv(kv(seq), kv(ref))  # the latent cache written in place is the single steps' too
    assert torch.equal(m.step([(m.new_sequence(), PROMPT)]), want[-1:])  # last-token logits only


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_prefill_close_to_single_steps(lib, ckpt, name, dtype, monkeypatch):
    """The plain form (keys / values decompressed for the prompt; chosen by cost for a prompt, and
    forced here too): the single steps' logits within float rounding, not their bits (bfloat16: the
    later layers' latents are rounded to bf16 from slightly different inputs, and bf16 products
    round their input to bf16: the absorbed form's query before W_UK, the plain form's latents,
    already bf16, not: ~2 bf16 steps of the largest logit); the first layer's latent cache
    (written before any attention) bit for bit theirs."""
    from moetier.native import mla_prefill

    m = load(ckpt(name), dtype=dtype)
    want, ref = one_by_one(m, PROMPT)
    tol = want.abs().max().item() * (1e-5 if dtype == "float32" else 1e-2)
    for mode in (None, True):
        monkeypatch.setattr(mla_prefill, "PLAIN", mode)
        seq = m.new_sequence()
        got = m.step([(seq, PROMPT)], all_logits=True)
        assert not torch.equal(got, want)  # the plain form ran
        assert maxdiff(got, want) <= tol, (mode, maxdiff(got, want))
        assert same_kv(kv(seq)[:1], kv(ref)[:1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_steps_equal_one_by_one(lib, ckpt, dtype):
    """Five sequences with different lengths, one flat batch mixing prefill chunks and single
    tokens, then batched decode steps: every row equals that sequence stepped alone."""
    m = load(ckpt("v3"), dtype=dtype)
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
    assert m.compute_paths()["batch"]["path"] == "native"
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


@pytest.mark.parametrize("plain,per_call", [(False, 7), (True, 6)])
def test_long_batches_split_into_calls(lib, ckpt, monkeypatch, plain, per_call):
    """Batches above MAX_CALL_TOKENS run as several calls (bounded scratch): the same bits, in the
    absorbed form and in the plain one (each call's piece of a prompt 2 tokens or more: a lone
    token takes the absorbed form)."""
    from moetier.native import mla_prefill, prefill

    monkeypatch.setattr(mla_prefill, "PLAIN", plain)
    m = load(ckpt("v2_qlora_yarn"))
    a0, b0 = m.new_sequence(), m.new_sequence()
    m.step([(a0, PROMPT[:5])])
    want = m.step([(a0, PROMPT[5:25]), (b0, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=True)
    monkeypatch.setattr(prefill, "MAX_CALL_TOKENS", per_call)
    a, b = m.new_sequence(), m.new_sequence()
    m.step([(a, PROMPT[:5])])
    got = m.step([(a, PROMPT[5:25]), (b, PROMPT[:13]), (m.new_sequence(), [4])], all_logits=True)
    assert torch.equal(got, want)
    assert a.length == 25 and b.length == 13 and same_kv(kv(a), kv(a0)) and same_kv(kv(b), kv(b0))


# ----------------------------------------------------------------------------------------
# 2. float32 vs the torch path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_prefill_matches_torch(lib, ckpt, name):
    m, t = load(ckpt(name)), moetier.load(ckpt(name), tokenizer=False, native=False)
    calls = count_many(m)
    got, toks = prefill_then_greedy(m, PROMPT, STEPS)
    want, toks_t = prefill_then_greedy(t, PROMPT, STEPS)
    assert calls == [len(PROMPT)]  # the prefill ran natively, the steps did not go through it
    assert got.shape == want.shape == (len(PROMPT) + STEPS, m.spec.vocab_size)
    assert torch.isfinite(got).all()
    assert maxdiff(got, want) <= 1e-4, f"{name}: max |native - torch| {maxdiff(got, want):.3g}"
    assert toks == toks_t
    paths = m.compute_paths()
    assert {k: (v["path"], v["reason"]) for k, v in paths.items()} == {
        "decode": ("native", None), "prefill": ("native", None), "batch": ("native", None)}
    assert paths["prefill"]["steps"] == 1 and paths["decode"]["steps"] == STEPS


# ----------------------------------------------------------------------------------------
# 3. thread count, ISA


@pytest.mark.parametrize("plain", [False, None])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_bit_identical(lib, ckpt, monkeypatch, dtype, plain):
    """120 tokens (two latent chunks): the products, the absorb or the decompression, the
    attention and the head really split over threads; and, absorbed, still the single steps' bits."""
    from moetier.native import mla_prefill

    monkeypatch.setattr(mla_prefill, "PLAIN", plain)
    m = load(ckpt("v3"), dtype=dtype)
    prompt = torch.randint(2, 250, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    before = torch.get_num_threads()
    runs = {}
    try:
        for nth in (1, 2, 3):
            torch.set_num_threads(nth)
            seq = m.new_sequence()
            logits = m.step([(seq, prompt)], all_logits=True)
            a, b = m.new_sequence(), m.new_sequence()
            m.step([(a, prompt[:50])])
            batch = m.step([(a, [5]), (b, prompt[:90])])
            runs[nth] = (logits, batch, kv(seq))
    finally:
        torch.set_num_threads(before)
    for nth, (logits, batch, cache) in runs.items():
        assert torch.equal(logits, runs[1][0]), f"{nth} threads: max diff {maxdiff(logits, runs[1][0]):.3g}"
        assert torch.equal(batch, runs[1][1])
        assert same_kv(cache, runs[1][2])
    want, _ = one_by_one(m, prompt)
    assert torch.equal(runs[1][0], want) == (plain is False), maxdiff(runs[1][0], want)


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_isa(lib, ckpt, absorbed, isa):
    from moetier.native import mla_prefill

    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa} (supported: {native.isas_supported()})")
    native.set_isa(isa)
    try:
        assert native.isa() == isa
        for name in ("v2_lite", "v3"):
            for dtype in ("float32", "bfloat16"):
                m = load(ckpt(name), dtype=dtype)
                got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
                want, _ = one_by_one(m, PROMPT)
                assert torch.equal(got, want), (isa, name, dtype, maxdiff(got, want))
                if dtype == "float32":
                    t = moetier.load(ckpt(name), tokenizer=False, native=False)
                    ref = t.step([(t.new_sequence(), PROMPT)], all_logits=True)
                    assert maxdiff(got, ref) <= 1e-4
                    mla_prefill.PLAIN = None  # the plain form under this ISA too (restored by `absorbed`)
                    assert maxdiff(m.step([(m.new_sequence(), PROMPT)], all_logits=True), ref) <= 1e-4
                    mla_prefill.PLAIN = False
    finally:
        native.set_isa(None)


# ----------------------------------------------------------------------------------------
# 4. providers, observers, quantized weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_providers_bit_identical(lib, ckpt, dtype):
    path = ckpt("v3")
    want, toks = prefill_then_greedy(load(path, dtype=dtype), PROMPT, 6)
    for cls in (DelegatingProvider, RecyclingProvider):  # one expert per native call
        m = load(path, dtype=dtype, expert_provider_factory=wrapped(cls))
        assert not getattr(m.provider, "stable_gets", False)
        got, _ = prefill_then_greedy(m, PROMPT, 6)
        assert torch.equal(got, want), (cls.__name__, maxdiff(got, want))
    tiered = load(path, dtype=dtype, policy="lru", cache_slots=2, prefetch=True)
    try:
        got, _ = prefill_then_greedy(tiered, PROMPT, 6)
        assert torch.equal(got, want), maxdiff(got, want)
        assert tiered.hierarchy_metrics.accesses > 0
    finally:
        tiered.hierarchy.close()
    capped = load(path, dtype=dtype, expert_cache=0.25)
    got, _ = prefill_then_greedy(capped, PROMPT, 6)
    assert torch.equal(got, want), maxdiff(got, want)


def test_router_observers_see_the_torch_routing(lib, ckpt):
    """Observers get [T, k] routings of the prefill, the torch path's experts and weights."""
    m = load(ckpt("v2_grouped"))
    t = moetier.load(ckpt("v2_grouped"), tokenizer=False, native=False)
    seen: dict[str, list] = {"m": [], "t": []}
    m.add_router_observer(lambda layer, ids, w: seen["m"].append((layer, ids, w)))
    t.add_router_observer(lambda layer, ids, w: seen["t"].append((layer, ids, w)))
    m.step([(m.new_sequence(), PROMPT)])
    t.step([(t.new_sequence(), PROMPT)])
    k = m.net.native.ffn[1].topk
    assert [s[0] for s in seen["m"]] == sorted(m.net.moe_blocks())
    for (la, ia, wa), (lb, ib, wb) in zip(seen["m"], seen["t"], strict=True):
        assert la == lb and ia.shape == (len(PROMPT), k) and ia.dtype == torch.int64 and wa.dtype == m.dtype
        order_a, order_b = ia.sort(-1), ib.sort(-1)  # torch.topk's order within a row is its own
        assert torch.equal(order_a.values, order_b.values)
        assert maxdiff(wa.gather(-1, order_a.indices), wb.gather(-1, order_b.indices)) < 1e-5


@pytest.mark.parametrize("quant,everything", [("int8", False), ("int4", True)])
def test_quantized_at_load(lib, ckpt, monkeypatch, quant, everything):
    """Quantized experts (and, with quantize_all, q_a / q_b / kv_a / kv_b / o_proj, the dense and
    shared MLPs and the head): the row kernels per token in the multi-token products, still bit
    for bit the single steps; kv_b_proj is read from its one plain copy (mla.plain_kv_b,
    tests/native/test_mla_quantized.py)."""
    path = ckpt("v2_qlora_yarn")
    m = moetier.load(path, tokenizer=False, quantize=quant, quantize_all=everything, quantize_group=32)
    if m.native_reason is not None:
        pytest.fail(f"native decode refused: {m.native_reason}")
    if everything:
        from moetier.quant import QTensor

        a = m.net.layers[0].self_attn
        assert all(isinstance(getattr(p, "qweight", None), QTensor)
                   for p in (a.q_a_proj, a.q_b_proj, a.kv_b_proj, a.o_proj))
        assert m.net.native.copy_bytes > 0
    from moetier.native import mla_prefill

    plain = m.step([(m.new_sequence(), PROMPT)], all_logits=True)  # the plain form (a prompt)
    monkeypatch.setattr(mla_prefill, "PLAIN", False)
    got = m.step([(m.new_sequence(), PROMPT)], all_logits=True)
    want, _ = one_by_one(m, PROMPT)
    assert torch.equal(got, want), maxdiff(got, want)
    t = moetier.load(path, tokenizer=False, quantize=quant, quantize_all=everything, quantize_group=32, native=False)
    ref = t.step([(t.new_sequence(), PROMPT)], all_logits=True)
    assert maxdiff(got, ref) <= 1e-4 and maxdiff(plain, ref) <= 1e-4


def test_norm_prehooks_see_the_batch(lib, ckpt):
    """The hierarchy's router prefetch hooks the post-attention norm: it gets [T, H] in the model
    dtype, the residual stream the torch path would hand it (float32: within 1e-4)."""
    m = load(ckpt("v3"))
    t = moetier.load(ckpt("v3"), tokenizer=False, native=False)
    got: dict[str, list] = {"m": [], "t": []}
    for k, model in (("m", m), ("t", t)):
        norm = model.net.layers[1].post_attention_layernorm
        norm.register_forward_pre_hook(lambda mod, args, k=k: got[k].append(args[0].clone()))
        model.step([(model.new_sequence(), PROMPT)])
    (a,), (b,) = got["m"], got["t"]
    assert a.shape == (len(PROMPT), m.spec.hidden_size) and a.dtype == m.dtype
    assert maxdiff(a, b) <= 1e-4


def test_bad_batches_refused(lib, ckpt):
    m = load(ckpt("v2_lite"))
    s = m.new_sequence()
    with pytest.raises(ValueError, match="twice"):
        m.net([(s, torch.tensor([1, 2])), (s, torch.tensor([3]))])
    with pytest.raises(ValueError, match="at least one"):
        m.net([(s, torch.tensor([1, 2])), (m.new_sequence(), torch.tensor([], dtype=torch.long))])
    assert s.length == 0  # nothing advanced
