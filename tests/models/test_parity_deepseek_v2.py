"""DeepSeek-V2 parity with transformers: MLA (with / without q_lora), YaRN, routing methods."""

import pytest

import tests.helpers.moe_families  # noqa: F401  (registers the recipes)
from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}

CONFIGS = {
    # V2-Lite shape: q straight from hidden, greedy softmax top-k, two shared experts, 1 dense layer
    "lite_greedy_2shared": dict(num_hidden_layers=3, n_shared_experts=2),
    # V2 shape: q_lora bottleneck, group-limited greedy (1 of 4 groups, so it differs from
    # plain greedy), YaRN with mscale_all_dim, scaled weights
    "qlora_grouped_yarn": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=1,
                               routed_scaling_factor=16.0, rope_parameters=YARN),
    # no shared experts, no dense layer, tied embeddings, MLA with attention biases
    "no_shared_tied_bias": dict(n_shared_experts=0, first_k_dense_replace=0, tie_word_embeddings=True,
                                attention_bias=True, num_experts_per_tok=3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_deepseek_v2_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "deepseek_v2", tokenizer=False, **CONFIGS[name])
    assert_parity(path)
