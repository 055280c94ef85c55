import pytest

from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

CONFIGS = {
    "shared_expert_qkv_bias": {},
    "no_shared_expert_norm_topk": dict(shared_expert_intermediate_size=0, norm_topk_prob=True),
    "gqa_dense_layer_tied": dict(num_attention_heads=8, num_key_value_heads=1, num_hidden_layers=3,
                                 mlp_only_layers=[1], tie_word_embeddings=True),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # shared expert of width 0
@pytest.mark.parametrize("name", CONFIGS)
def test_qwen2_moe_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "qwen2_moe", **CONFIGS[name])
    assert_parity(path)
