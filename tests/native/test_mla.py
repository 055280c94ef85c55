"""Native MLA decode (DeepSeek-V2 / V3 / Kimi-K2) against the torch path, on tiny checkpoints.

Each config exercises one of: q_lora_rank None / set, softmax greedy / group_limited_greedy /
noaux_tc (sigmoid + correction bias, routed_scaling_factor, norm_topk_prob), shared experts,
dense-first layers, YaRN (mscale_all_dim folded into the softmax scale), pair / half rope
layouts, attention biases. float32: <= 1e-4 max |dlogit| over a 40-token prefill (native:
mla_prefill.py) and 16 native greedy steps, same tokens; the native decoder really ran (descriptors read back).
"""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers the deepseek recipes)
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.native.common import ckpt_fixture, greedy_steps

PROMPT = [(7 * i + 3) % 250 + 2 for i in range(40)]
STEPS = 16
TOL = 1e-4

YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

CONFIGS: dict[str, tuple[str, dict]] = {
    "v2_lite": ("deepseek_v2", {}),  # q_proj, softmax greedy, shared expert, dense layer 0
    "v2_grouped": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                       num_experts_per_tok=3, routed_scaling_factor=1.5)),
    "v2_qlora_yarn": ("deepseek_v2", dict(q_lora_rank=24, rope_parameters=YARN, max_position_embeddings=128,
                                          norm_topk_prob=True)),
    "v3": ("deepseek_v3", {}),  # q_lora, noaux_tc sigmoid 4 groups / top 2, scaling 2.5, norm_topk_prob
    "v3_halves_bias_noshared": ("deepseek_v3", dict(rope_interleave=False, attention_bias=True, n_shared_experts=0,
                                                    first_k_dense_replace=0, norm_topk_prob=False)),
}


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

ckpt = ckpt_fixture(CONFIGS)


def greedy(model, prompt, steps):
    return greedy_steps(model, prompt, steps, first=7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_mla_matches_torch(lib, ckpt, name):
    from moetier.native.mla import MLADecoder

    m = moetier.load(ckpt(name), tokenizer=False, dtype="float32")
    t = moetier.load(ckpt(name), tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None and isinstance(m.net.native, MLADecoder)
    got, gt = greedy(m, PROMPT, STEPS)
    want, wt = greedy(t, PROMPT, STEPS)
    assert gt == wt
    assert (got - want).abs().max().item() <= TOL
    assert m.compute_paths()["decode"]["steps"] == STEPS and m.compute_paths()["decode"]["path"] == "native"


def test_descriptors_cover_the_configs(lib, ckpt):
    """The configs really exercise what they claim (read back from the native descriptors)."""
    def dec(name):
        return moetier.load(ckpt(name), tokenizer=False, dtype="float32").net.native

    v2, grouped, qlora, v3, halves = (dec(n) for n in CONFIGS)
    assert [m.Rq for m in v2.mla] == [0, 0] and [m.Rq for m in qlora.mla] == [24, 24]
    assert [d.mlp for d in v2.ffn] == [0, 1] and v2.ffn[1].SI > 0  # dense-first, shared expert
    assert v2.routes[1].method == 0 and v2.routes[1].sigmoid == 0
    assert grouped.routes[1].method == 1 and grouped.routes[1].n_group == 4 and grouped.routes[1].topk == 3
    assert v3.routes[1].method == 2 and v3.routes[1].sigmoid == 1 and v3.routes[1].corr
    assert v3.routes[1].scaling == pytest.approx(2.5) and v3.routes[1].scale_after_norm == 1
    assert qlora.routes[1].scale_after_norm == 0 and qlora.routes[1].norm_topk == 1  # V2 semantics
    assert all(m.interleaved for m in v3.mla) and not any(m.interleaved for m in halves.mla)
    assert halves.mla[0].kva_b and halves.mla[0].o_b and halves.ffn[0].SI == 0 and halves.ffn[0].mlp == 1
    # YaRN: mscale_all_dim folded into the softmax scale (factor 4, mscale_all_dim 1 -> x 1.1386^2)
    plain = (16 + 8) ** -0.5
    assert qlora.mla[0].scale == pytest.approx(plain * (0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)
    assert v2.mla[0].scale == pytest.approx(plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_bit_identical(lib, ckpt, dtype):
    m = moetier.load(ckpt("v3"), tokenizer=False, dtype=dtype)
    before = torch.get_num_threads()
    try:
        seqs = {}
        for nth in (1, 3):
            torch.set_num_threads(nth)
            seq = m.new_sequence()
            logits = [m.step([(seq, [t])])[0] for t in PROMPT[:12]]  # single-token steps only
            seqs[nth] = torch.stack(logits)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(seqs[1], seqs[3])


def test_bfloat16_close_to_float32(lib, ckpt):
    """bf16 weights and latent cache, float32 activations: the native steps stay near float32."""
    f = moetier.load(ckpt("v3"), tokenizer=False, dtype="float32")
    b = moetier.load(ckpt("v3"), tokenizer=False, dtype="bfloat16")
    assert b.native_reason is None
    want, _ = greedy(f, PROMPT[:8], 8)
    seq = b.new_sequence()
    got = [b.step([(seq, PROMPT[:8])])[0]]
    for t in want[:-1].argmax(-1).tolist():
        got.append(b.step([(seq, [t])])[0])
    diff = (torch.stack(got) - want).abs().max().item()
    assert diff < 0.1 * want.abs().max().item()


def test_router_observers_and_tiered_provider_same_bits(lib, ckpt, tmp_path):
    """Observers see the native routing; a tiered provider (one expert per call) gives the same bits."""
    m = moetier.load(ckpt("v3"), tokenizer=False, dtype="float32")
    seen = []
    m.add_router_observer(lambda layer, ids, w: seen.append((layer, ids.tolist(), w.tolist())))
    want, _ = greedy(m, PROMPT[:8], 4)
    native_seen = [s for s in seen if len(s[1]) == 1]  # the single-token steps
    assert len(native_seen) == 4 * len(m.net.moe_blocks()) and all(len(s[1][0]) == 2 for s in native_seen)
    t = moetier.load(ckpt("v3"), tokenizer=False, dtype="float32", native=False)
    seen.clear()
    t.add_router_observer(lambda layer, ids, w: seen.append((layer, ids.tolist(), w.tolist())))
    greedy(t, PROMPT[:8], 4)
    torch_seen = [s for s in seen if len(s[1]) == 1]
    for (la, ia, wa), (lb, ib, wb) in zip(native_seen, torch_seen, strict=True):
        assert la == lb and sorted(ia[0]) == sorted(ib[0])
        assert sorted(wa[0]) == pytest.approx(sorted(wb[0]), abs=1e-5)
    h = moetier.load(ckpt("v3"), tokenizer=False, dtype="float32", expert_cache=0.25)
    assert h.native_reason is None
    got, _ = greedy(h, PROMPT[:8], 4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["v2_lite", "v3", "v3_halves_bias_noshared"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_step_path_bit_identical(lib, ckpt, name, dtype):
    """In-RAM experts, no observer: one native call for all layers (``mt_mla_layers``); a no-op
    router observer forces the per-layer Python-driven path. Same bits, and the whole-step path
    is really taken (its expert tables get built) only without the observer."""
    fast = moetier.load(ckpt(name), tokenizer=False, dtype=dtype)
    want, toks = greedy(fast, PROMPT, 10)
    assert fast.net.native.table_for is fast.provider
    slow = moetier.load(ckpt(name), tokenizer=False, dtype=dtype)
    slow.add_router_observer(lambda layer, ids, w: None)
    got, toks_s = greedy(slow, PROMPT, 10)
    assert slow.net.native.table_for is None
    assert torch.equal(got, want), (got - want).abs().max().item()
    assert toks_s == toks


def test_kept_groups_smaller_than_top_k_fall_back(lib, tmp_path):
    """top-k larger than the experts of the kept groups: torch.topk's choice among the masked
    experts is unspecified, so this (degenerate) routing stays on the torch path, with a reason."""
    d = make_tiny_checkpoint(tmp_path, "deepseek_v3", tokenizer=False, topk_group=1, num_experts_per_tok=3)
    m = moetier.load(d, tokenizer=False, dtype="float32")
    assert m.net.native is None and "kept expert groups" in m.native_reason
    assert m.compute_paths()["decode"] == {"path": "torch", "reason": m.native_reason, "steps": 0}
