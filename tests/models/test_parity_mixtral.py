import pytest

from tests.helpers import fuse_experts, make_tiny_checkpoint
from tests.helpers.parity import assert_parity

CONFIGS = {
    "base": {},
    "gqa_headdim_top3": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts_per_tok=3),
    # a window shorter than the prompt exercises the sliding mask in prefill and decode
    "sliding_window": dict(sliding_window=12),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_mixtral_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "mixtral", **CONFIGS[name])
    assert_parity(path)


def test_mixtral_fused_expert_layout(tmp_path):
    """Fused experts.gate_up_proj / experts.down_proj on disk give the same model."""
    path = make_tiny_checkpoint(tmp_path, "mixtral")
    import moetier

    before = moetier.load(path, tokenizer=False).logits(list(range(40)))
    fuse_experts(path)
    after = moetier.load(path, tokenizer=False).logits(list(range(40)))
    assert (before == after).all()
