"""Quantized releases end to end (issue 14): tiny checkpoints in each released on-disk layout
vs transformers running the *dequantized* weights in float32 — max |dlogit| <= 1e-4 over a
32-token prefill and 16 greedy steps, same tokens. Tiered runs equal in-RAM runs exactly."""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers deepseek_v3 / gpt_oss recipes)
from moetier.layers.linear import QLinear
from moetier.quant import QTensor
from tests.helpers.parity import assert_parity
from tests.helpers.quantized import make_quantized_checkpoint, write_dequantized

CASES = {
    # DeepSeek-V3 FP8 release layout, q_lora, an MTP layer on disk; kv_a_proj_with_mqa is
    # [kv_lora 32 + rope 8 = 40, 64]: with 16x16 blocks its last row block is partial (as
    # DeepSeek-V3's [576, 7168] in 128x128 blocks)
    "deepseek_v3_fp8_b16": ("deepseek_v3", "fp8", dict(block=(16, 16), mtp=True)),
    "deepseek_v3_fp8_b128": ("deepseek_v3", "fp8", dict(block=(128, 128), q_lora_rank=None, mtp=True)),
    "gpt_oss_mxfp4": ("gpt_oss", "mxfp4", {}),
    "qwen3_moe_int4_g32": ("qwen3_moe", "int4", dict(group=32)),
    # expert intermediate 48: down_proj's rows end in a partial group of 32
    "mixtral_int4_g32_partial": ("mixtral", "int4", dict(group=32, intermediate_size=48)),
    "mixtral_int8_g64_experts": ("mixtral", "int8", dict(group=64, experts_only=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_quantized_release_matches_dequantized_transformers(tmp_path, case):
    family, fmt, kw = CASES[case]
    ck = make_quantized_checkpoint(tmp_path, family, fmt, tokenizer=False, num_hidden_layers=2, **kw)
    ref = write_dequantized(ck, tmp_path / "dequantized")
    ours = moetier.load(ck, dtype="float32", tokenizer=False)
    # weights stay in their stored format
    w = ours.provider.get(ours.spec.moe_layer_ids[0], 0)
    assert w.quantized and isinstance(w.down, QTensor)
    n_q = sum(isinstance(m, QLinear) for m in ours.net.modules())
    assert (n_q > 0) == (fmt in ("fp8", "int4", "int8") and not kw.get("experts_only"))
    worst = assert_parity(ck, prompt_len=32, steps=16, atol=1e-4, ref_path=ref, ours=ours)
    assert worst <= 1e-4


def test_tiered_quantized_equals_in_ram(tmp_path):
    ck = make_quantized_checkpoint(tmp_path, "qwen3_moe", "int4", group=32, tokenizer=False, num_hidden_layers=2)
    ram = moetier.load(ck, tokenizer=False)
    tiered = moetier.load(ck, tokenizer=False, expert_cache=0.25, policy="lru")
    try:
        layout = tiered.hierarchy.layout
        assert layout.expert_bytes == ram.expert_reader.expert_nbytes() == ram.provider.get(1, 0).nbytes
        ids = list(range(3, 40))
        assert torch.equal(tiered.logits(ids), ram.logits(ids))
        a = tiered.generate_ids(ids[:5], max_tokens=8)
        b = ram.generate_ids(ids[:5], max_tokens=8)
        assert a.ids == b.ids and len(a.ids) == 8
        # the slots hold stored bytes: int4 + bf16 scales per 32 is ~4.5 bits a weight
        s = ram.spec
        assert layout.expert_bytes == 3 * s.hidden_size * s.expert_intermediate_size * 9 // 16
        assert tiered.hierarchy_metrics.summary()["tokens"] > 0
    finally:
        tiered.hierarchy.close()
