"""Quantized GGUF files (llama.cpp's converter / quantizer) run exactly their dequantized weights.

Oracle: transformers' own GGUF loader (it dequantizes every tensor with gguf-py's numpy
``gguf.quants.dequantize``, independently of moetier's torch dequantizers) running the same
file in float32. Also every stored tensor of the fixtures is compared bit for bit with
``gguf.quants.dequantize`` of its bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moetier
from moetier.quant import QTensor
from moetier.weights.gguf_io import GGUFIndex
from tests.gguf.helpers import DATA, fixture, rewrite_gguf

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

QUANTIZED = ["qwen3moe-q8_0", "qwen3moe-legacy", "qwen3moe-kquant", "qwen3moe-mxfp4"]
ALL_QUANTIZED = [*QUANTIZED, "gptoss-mxfp4", "deepseek2-q8_0"]  # transformers' GGUF loader cannot read these


# the block types each quantized fixture must hold, and the llama ftype its recipe writes
# (general.file_type: llama.cpp's quantizer writes the recipe's; gguf-py's requantization
# would keep the F32 source's 0; scripts/make_gguf_fixtures.py)
FIXTURE_TYPES = {"qwen3moe-legacy": ({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}, 7),
                 "qwen3moe-kquant": ({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, 15),
                 "qwen3moe-mxfp4": ({"MXFP4", "Q8_0"}, 38), "gptoss-mxfp4": ({"MXFP4", "Q8_0"}, 38),
                 "deepseek2-q8_0": ({"Q8_0"}, 7)}


@pytest.mark.parametrize("name", sorted(FIXTURE_TYPES))
def test_quantized_fixtures_are_llama_cpp_quantizer_output(name: str) -> None:
    want, ftype = FIXTURE_TYPES[name]
    r = gguf.GGUFReader(fixture(name))
    have = {t.tensor_type.name for t in r.tensors}
    assert want <= have, (name, have)
    assert r.fields["general.file_type"].contents() == ftype


def transformers_gguf(name: str, spec) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # transformers' GGUF config mapping misses expert_feed_forward_length and norm_topk_prob
    return AutoModelForCausalLM.from_pretrained(
        DATA, gguf_file=f"{name}.gguf", dtype=torch.float32, attn_implementation="eager",
        moe_intermediate_size=spec.expert_intermediate_size, norm_topk_prob=spec.norm_topk_prob).eval()


@pytest.mark.parametrize("name", ALL_QUANTIZED)
def test_every_tensor_dequantizes_like_gguf_py(name: str) -> None:
    idx = GGUFIndex(fixture(name))
    r = gguf.GGUFReader(fixture(name))
    types = set()
    for t in r.tensors:
        info = idx.gguf[t.name]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        w = idx._stored(info, 0, rows)
        want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                     dtype=np.float32)).reshape(rows, -1)
        got = w.dequantize() if isinstance(w, QTensor) else w.float()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), t.name
        types.add(t.tensor_type.name)
    assert types - {"F32", "F16", "BF16"}, types


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_gguf_matches_its_dequantized_float32_model(name: str) -> None:
    ours = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    ref = transformers_gguf(name, ours.spec)
    prompt = torch.randint(3, ours.spec.vocab_size, (17,), generator=torch.Generator().manual_seed(1))
    got = ours.logits(prompt)
    with torch.no_grad():
        want = ref(prompt[None]).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
    # greedy decode steps (the native decoder when it covers the model) through the KV cache
    seq = ours.new_sequence(capacity=32)
    ours.step([(seq, prompt)])
    ids = prompt.tolist()
    for _ in range(4):
        ids.append(int(want[-1].argmax()))
        got = ours.step([(seq, [ids[-1]])])
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert (got[0] - want[-1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ALL_QUANTIZED)
def test_tiered_store_serves_stored_blocks_from_the_gguf_file(name: str) -> None:
    """--max-ram style hierarchy: experts read from the user's GGUF (stored bytes into the
    slots, no conversion); same logits as every expert in RAM."""
    ram = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    tiered = moetier.load(fixture(name), dtype="float32", tokenizer=False, expert_cache=0.5)
    assert type(tiered.provider).__name__ == "TieredExpertProvider"
    prompt = [5, 17, 40, 99, 3, 250, 12, 7]
    assert torch.equal(ram.logits(prompt), tiered.logits(prompt))
    e = ram.provider.get(ram.spec.moe_layer_ids[0], 1)
    assert e.quantized and e.nbytes == ram.expert_reader.expert_nbytes()
    assert tiered.hierarchy_metrics.summary()["store_bytes_demand"] > 0


def test_tiered_store_serves_layers_that_store_experts_in_different_types(tmp_path) -> None:
    """llama.cpp's K-quant recipes give ``ffn_down_exps`` a different type in some layers
    (Q4_K_M: Q6_K in some, Q4_K in the others): the tiered store keeps one slot layout per
    structure (a slot as large as the largest) and serves each layer with its own; same
    logits as every expert in RAM."""
    from moetier.weights.store import LayeredSlotLayout

    f = tmp_path / "mixed.gguf"
    q5_0 = int(gguf.GGMLQuantizationType.Q5_0)
    rewrite_gguf(fixture("qwen3moe-q8_0"), f, requant={"blk.1.ffn_down_exps.weight": q5_0})
    ram = moetier.load(f, dtype="float32", tokenizer=False)
    assert [ram.provider.get(i, 0).down.fmt for i in (0, 1)] == ["q8_0", "q5_0"]
    for opts in ({"expert_cache": 0.5}, {"expert_cache": 0}, {"max_ram": "4G"}):  # cached, bypassed, budget
        tiered = moetier.load(f, dtype="float32", tokenizer=False, **opts)
        lay = tiered.hierarchy.layout
        assert isinstance(lay, LayeredSlotLayout) and lay.variants == 2 and lay.variant_of(0) != lay.variant_of(1)
        assert lay.slot_bytes == max(x.slot_bytes for x in lay.layouts)
        prompt = [5, 17, 40, 99, 3, 250, 12, 7]
        assert torch.equal(ram.logits(prompt), tiered.logits(prompt)), opts
        seq_r, seq_t = ram.new_sequence(capacity=12), tiered.new_sequence(capacity=12)
        for ids in (prompt, [9], [33]):  # the decode path too
            assert torch.equal(ram.step([(seq_r, ids)])[0], tiered.step([(seq_t, ids)])[0]), opts


def _dequantized(r, name: str) -> torch.Tensor:
    t = next(t for t in r.tensors if t.name == name)
    shape = [int(x) for x in reversed(t.shape.tolist())]
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                 dtype=np.float32)).reshape(shape)


def test_gpt_oss_mxfp4_gguf_matches_transformers_on_the_dequantized_weights() -> None:
    """gpt-oss as released (MXFP4 experts, separate gate / up in GGUF): transformers' gpt-oss
    with its linear weights replaced by gguf-py's dequantization of the file's tensors."""
    from tests.gguf.helpers import hf_original

    name = "gptoss-mxfp4"
    r = gguf.GGUFReader(fixture(name))
    ref = hf_original(name)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(_dequantized(r, "token_embd.weight"))
        ref.lm_head.weight.copy_(_dequantized(r, "output.weight"))
        for i, layer in enumerate(ref.model.layers):
            a = layer.self_attn
            for proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                            ("o_proj", "attn_output")):
                getattr(a, proj).weight.copy_(_dequantized(r, f"blk.{i}.{g}.weight"))
            ex = layer.mlp.experts  # gate_up_proj [E, H, 2I] (gate even, up odd columns), down_proj [E, I, H]
            ex.gate_up_proj[:, :, 0::2] = _dequantized(r, f"blk.{i}.ffn_gate_exps.weight").transpose(1, 2)
            ex.gate_up_proj[:, :, 1::2] = _dequantized(r, f"blk.{i}.ffn_up_exps.weight").transpose(1, 2)
            ex.down_proj.copy_(_dequantized(r, f"blk.{i}.ffn_down_exps.weight").transpose(1, 2))
    ours = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    e = ours.provider.get(0, 0)
    assert e.split is not None and e.split[0].fmt == "ggml_mxfp4" and e.down.fmt == "ggml_mxfp4"
    prompt = torch.randint(3, ours.spec.vocab_size, (21,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(prompt[None]).logits[0]
    assert (ours.logits(prompt) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ALL_QUANTIZED)
def test_hierarchy_budget_counts_stored_bytes(name: str) -> None:
    from moetier.planner.census import census
    from moetier.weights.gguf_io import stored_census

    ours = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    fp32 = census(ours.spec, "fp32")
    st = stored_census(fixture(name), fp32, torch.float32)
    assert st.expert_bytes == ours.expert_reader.expert_nbytes() < fp32.expert_bytes
    assert st.always_on_bytes < fp32.always_on_bytes
    capped = moetier.load(fixture(name), dtype="float32", tokenizer=False, max_ram="4G")
    assert capped.memory_budget is not None
    assert capped.hierarchy.layout.expert_bytes >= st.expert_bytes
    prompt = [5, 17, 40, 99, 3, 250, 12, 7]
    assert torch.equal(ours.logits(prompt), capped.logits(prompt))


def test_deepseek2_q8_0_gguf_matches_transformers_on_the_dequantized_weights() -> None:
    """DeepSeek-V3 architecture (MLA: quantized q_a / kv_a / o projections as QLinear, kv_b
    rebuilt from attn_k_b / attn_v_b; quantized shared and routed experts; exp_probs_b)."""
    from tests.gguf.helpers import hf_original

    name = "deepseek2-q8_0"
    r = gguf.GGUFReader(fixture(name))
    ref = hf_original(name)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, ref.config.num_hidden_layers)
    names = {t.name for t in r.tensors}
    with torch.no_grad():
        for n, p in ref.named_parameters():
            g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            if g is not None and g in names:
                p.copy_(_dequantized(r, g).reshape(p.shape))
        for i, layer in enumerate(ref.model.layers):
            kb, vb = _dequantized(r, f"blk.{i}.attn_k_b.weight"), _dequantized(r, f"blk.{i}.attn_v_b.weight")
            kv = torch.cat([kb.transpose(1, 2), vb], dim=1)  # [heads, nope + v, kv_lora_rank]
            layer.self_attn.kv_b_proj.weight.copy_(kv.reshape(-1, kv.shape[-1]))
            if f"blk.{i}.ffn_gate_exps.weight" in names:
                ex = layer.mlp.experts  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
                gate, up = (_dequantized(r, f"blk.{i}.ffn_{w}_exps.weight") for w in ("gate", "up"))
                ex.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
                ex.down_proj.copy_(_dequantized(r, f"blk.{i}.ffn_down_exps.weight"))
                layer.mlp.gate.e_score_correction_bias.copy_(_dequantized(r, f"blk.{i}.exp_probs_b.bias"))
    ours = moetier.load(fixture(name), dtype="float32", tokenizer=False)
    assert ours.spec.family == "deepseek_v3" and ours.spec.attention == "mla"
    assert ours.provider.get(1, 0).quantized
    prompt = torch.randint(3, ours.spec.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(prompt[None]).logits[0]
    assert (ours.logits(prompt) - want).abs().max().item() <= 1e-4
