import pytest

from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    "base": {},
    "gqa_headdim_bias_tied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                  attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn_rope": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_llama_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "llama", **CONFIGS[name])
    assert_parity(path)
