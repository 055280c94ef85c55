"""gpt-oss parity with transformers: sinks, sliding window shorter than the sequence,
YaRN (truncate=false), clamped SwiGLU on interleaved fused experts with biases."""

import pytest

import tests.helpers.moe_families  # noqa: F401  (registers the recipes)
from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

CONFIGS = {
    # default layer_types: sliding (window 8 << 49 tokens), full, sliding; GQA 4:2; YaRN x32
    "sliding_sinks_yarn": dict(num_hidden_layers=3),
    # GQA 4:1, top-1 routing, tiny window, plain rope, tied embeddings
    "mqa_top1_tied": dict(num_key_value_heads=1, num_experts_per_tok=1, sliding_window=3,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          tie_word_embeddings=True),
    # every layer full attention, top-4 of 8
    "full_top4": dict(layer_types=["full_attention", "full_attention"], num_experts_per_tok=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_gpt_oss_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "gpt_oss", tokenizer=False, **CONFIGS[name])
    assert_parity(path)
