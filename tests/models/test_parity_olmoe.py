import pytest

from tests.helpers import make_tiny_checkpoint
from tests.helpers.parity import assert_parity

CONFIGS = {
    "base": {},
    "gqa_norm_topk_tied": dict(num_attention_heads=8, num_key_value_heads=2, norm_topk_prob=True,
                               tie_word_embeddings=True),
    "clip_qkv_mha": dict(clip_qkv=0.5, num_key_value_heads=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_olmoe_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "olmoe", **CONFIGS[name])
    assert_parity(path)
