"""Native decode with quantized weights: QTensor experts (fused gate_up, or gate and up stored
separately as strided row views, like gpt-oss's interleaved rows), unfused q/k/v projections,
a quantized output head; agreement with the torch path on the same dequantized weights, and
bit-identity across the whole-step, stable-provider and per-expert paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import moetier
from moetier import native
from moetier.models.base import ExpertWeights, InMemoryExpertProvider
from moetier.native import decode as native_decode
from moetier.quant import QTensor
from tests.helpers import make_tiny_checkpoint

G = 16  # int8 group size


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("q"), "qwen2_moe", tokenizer=False,
                                hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                num_experts_per_tok=3, attention_bias=True)


def int8_group(w: torch.Tensor) -> tuple[QTensor, torch.Tensor]:
    """Symmetric int8, one float32 scale per G columns (written here, independent of the
    kernels): (QTensor, its float32 dequantized values)."""
    rows, cols = w.shape
    s = (w.view(rows, cols // G, G).abs().amax(-1) / 127).clamp_min(1e-8)  # [rows, groups]
    q = torch.round(w / s.repeat_interleave(G, 1)).clamp(-128, 127)
    data = (q.to(torch.int64) + 128).to(torch.uint8).view(torch.int32)  # 4 values per word, low byte first
    return QTensor("int8_group", (rows, cols), data, s, block=(1, G)), q * s.repeat_interleave(G, 1)


@dataclass(frozen=True, eq=False)
class SplitExpert:
    """An expert with gate and up stored separately (the ``ExpertWeights.split`` layout)."""

    down: QTensor
    split: tuple[QTensor, QTensor]
    gate_up: None = None
    gate_up_bias: None = None
    down_bias: None = None


def quantized_experts(model, split: bool):
    """(experts for the native path, dequantized float experts for the torch path)."""
    prov = model.net.moe_blocks()[0].provider
    q_experts, f_experts = {}, {}
    for key, ew in prov.experts.items():
        I = ew.gate_up.shape[0] // 2
        dn_q, dn_f = int8_group(ew.down)
        if split:  # gate / up as every other row of one interleaved tensor (no copy)
            inter = torch.stack([ew.gate_up[:I], ew.gate_up[I:]], 1).reshape(2 * I, -1)
            both_q, both_f = int8_group(inter)
            gate = QTensor("int8_group", (I, both_q.cols), both_q.data[0::2], both_q.scale[0::2], block=(1, G))
            up = QTensor("int8_group", (I, both_q.cols), both_q.data[1::2], both_q.scale[1::2], block=(1, G))
            q_experts[key] = SplitExpert(dn_q, (gate, up))
            gu_f = torch.cat([both_f[0::2], both_f[1::2]])
        else:
            gu_q, gu_f = int8_group(ew.gate_up)
            q_experts[key] = ExpertWeights(gu_q, dn_q)
        f_experts[key] = ExpertWeights(gu_f.contiguous(), dn_f.contiguous())
    return q_experts, f_experts


class OneAtATime:
    """A provider whose get() results may be recycled: the per-expert native path."""

    stable_gets = False

    def __init__(self, experts):
        self.experts = experts

    def require(self, layer, ids):
        pass

    def get(self, layer, expert):
        return self.experts[(layer, expert)]


class Stable(OneAtATime):
    stable_gets = True


def decode(model, prompt=(5, 17, 42, 7)):
    """Logits of a prefill (torch path; skipped when ``prompt`` is empty) and 6 single-token
    steps (native path)."""
    seq = model.new_sequence()
    out = [model.step([(seq, list(prompt))])[0]] if prompt else []
    for t in (9, 200, 2, 77, 128, 3):
        out.append(model.step([(seq, [t])])[0])
    return torch.stack(out)


@pytest.mark.parametrize("split", [False, True])
def test_quantized_experts_match_torch(lib, ckpt, split):
    m = moetier.load(ckpt, tokenizer=False, dtype="float32")
    t = moetier.load(ckpt, tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None
    q_experts, f_experts = quantized_experts(m, split)
    t.net.attach(InMemoryExpertProvider(f_experts))
    want = decode(t, ())  # single tokens only (the torch path here has no QTensor experts)
    got = {}
    for name, prov in (("table", InMemoryExpertProvider(q_experts)), ("stable", Stable(q_experts)),
                       ("one", OneAtATime(q_experts))):
        m.net.attach(prov)
        got[name] = decode(m, ())
    assert ((got["table"] - want).abs() <= 1e-5 + 1e-6 * want.abs()).all(), (got["table"] - want).abs().max()
    assert torch.equal(got["table"], got["stable"]) and torch.equal(got["table"], got["one"])


def test_unfused_qkv_and_quantized_head_and_dense(lib, ckpt):
    """Separate q/k/v projections give the same bits as the fused matrix (same rows, same
    kernel); a quantized head and shared expert (QLinear-like modules with ``qweight``) match
    the torch path on their dequantized values."""
    m = moetier.load(ckpt, tokenizer=False, dtype="float32")
    fused = decode(m)
    for layer in m.net.layers:
        layer.self_attn.qkv_weight = None  # q/k/v modules keep their (view) weights
        layer.self_attn.qkv_bias = None
    dec, reason = native_decode.build(m.net)
    assert reason is None and all(d.qkv_w is None and d.q_w and d.k_w and d.v_w for d in dec.descs)
    m.net.native = dec
    assert torch.equal(decode(m), fused)

    # quantize the output head and the shared experts' projections; the torch reference uses
    # their dequantized values as plain weights
    t = moetier.load(ckpt, tokenizer=False, dtype="float32", native=False)

    class Q(torch.nn.Module):  # the QLinear surface the native decoder reads: .qweight, .bias
        def __init__(self, qweight):
            super().__init__()
            self.qweight, self.bias = qweight, None

    def swap(mod_m, mod_t, name):
        lin = getattr(mod_m, name)
        qw, deq = int8_group(lin.weight.detach())
        setattr(mod_m, name, Q(qw))
        getattr(mod_t, name).weight.data.copy_(deq)

    assert m.net.lm_head is not None
    swap(m.net, t.net, "lm_head")
    for lm, lt in zip(m.net.layers, t.net.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            swap(lm.mlp.shared_expert, lt.mlp.shared_expert, name)
    dec, reason = native_decode.build(m.net)
    assert reason is None, reason
    m.net.native = dec
    got, want = decode(m, ()), decode(t, ())  # single tokens only: m's swapped modules have no torch forward
    assert ((got - want).abs() <= 1e-5 + 1e-6 * want.abs()).all(), (got - want).abs().max()


# ----------------------------------------------------------------------------------------
# quantized releases (tests.helpers.quantized: the on-disk layouts) through the native path

RELEASES = {
    "qwen3_moe_int4_g32": ("qwen3_moe", "int4", dict(group=32)),
    "mixtral_int4_partial_group": ("mixtral", "int4", dict(group=32, intermediate_size=48)),
    "mixtral_int8_g64_experts_only": ("mixtral", "int8", dict(group=64, experts_only=True)),
    "qwen3_moe_fp8_b16": ("qwen3_moe", "fp8", dict(block=(16, 16))),
    "olmoe_fp8_b128": ("olmoe", "fp8", dict(block=(128, 128))),
}


def steps(model, ids, toks):
    seq = model.new_sequence()
    out = [model.step([(seq, ids)])[0]]
    for t in toks:
        out.append(model.step([(seq, [t])])[0])
    return torch.stack(out)


@pytest.mark.parametrize("case", RELEASES)
def test_quantized_release_native_matches_torch(lib, tmp_path, case):
    from tests.helpers.quantized import make_quantized_checkpoint

    family, fmt, kw = RELEASES[case]
    ck = make_quantized_checkpoint(tmp_path, family, fmt, tokenizer=False, num_hidden_layers=2, **kw)
    m = moetier.load(ck, dtype="float32", tokenizer=False)
    t = moetier.load(ck, dtype="float32", tokenizer=False, native=False)
    assert m.native_reason is None, m.native_reason
    assert m.provider.get(m.spec.moe_layer_ids[0], 0).quantized
    ids, toks = list(range(3, 20)), [5, 9, 77, 3, 250, 11]
    got, want = steps(m, ids, toks), steps(t, ids, toks)
    assert ((got - want).abs() <= 1e-5 + 1e-6 * want.abs()).all(), (got - want).abs().max().item()
    # thread-count independence of the native prefill and steps
    n0 = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(steps(m, ids, toks))
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    native.set_isa("scalar")
    try:
        s = steps(m, ids, toks)
    finally:
        native.set_isa(None)
    assert ((s - want).abs() <= 1e-5 + 1e-6 * want.abs()).all()
