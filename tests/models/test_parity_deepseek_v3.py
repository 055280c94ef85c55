"""DeepSeek-V3 parity with transformers: noaux_tc routing with a random correction bias,
sigmoid scores, renormalise-then-scale, YaRN (DeepSeek mscale), both rope layouts."""

import pytest

import tests.helpers.moe_families  # noqa: F401  (registers the recipes)
from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

CONFIGS = {
    # V3 shape: q_lora, 4 groups keep 2 (1 of them could hold both picks), bias-driven choice, YaRN
    "noaux_tc_yarn": dict(rope_parameters=YARN, num_hidden_layers=3),
    # one group kept of 4, top-3, two shared experts, q from hidden, rotate-half rope, tied
    "one_group_halves_tied": dict(q_lora_rank=None, topk_group=1, num_experts_per_tok=3, n_shared_experts=2,
                                  rope_interleave=False, tie_word_embeddings=True),
    # no grouping, no shared expert, no dense layer, unit scaling
    "flat_no_shared": dict(n_group=1, topk_group=1, n_shared_experts=0, first_k_dense_replace=0,
                           routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_deepseek_v3_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "deepseek_v3", tokenizer=False, **CONFIGS[name])
    assert_parity(path)
