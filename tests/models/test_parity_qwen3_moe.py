import pytest

from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

CONFIGS = {
    "base": {},
    # GQA 4:1, head_dim != hidden/heads, no renormalisation of top-k
    "gqa4_headdim_nonorm": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12, norm_topk_prob=False),
    # dense layer 0 via mlp_only_layers, sparse step 1, tied embeddings, top-3 of 8
    "dense_layer_tied": dict(num_hidden_layers=3, mlp_only_layers=[0], tie_word_embeddings=True,
                              num_experts_per_tok=3),
    # decoder_sparse_step=2: layers 1, 3 are MoE; MHA (no GQA)
    "sparse_step2_mha": dict(num_hidden_layers=4, decoder_sparse_step=2, num_key_value_heads=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_qwen3_moe_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "qwen3_moe", **CONFIGS[name])
    assert_parity(path)
