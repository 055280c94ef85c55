"""A prompt longer than the context is refused naming both numbers; generation stops at the
context (the model's window, or the KV cache a --max-ram budget reserved), never past it."""

from __future__ import annotations

import pytest

import moetier
from moetier.errors import MoetierError
from moetier.weights import tiered
from tests.helpers import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ctx"), "qwen3_moe", tokenizer=False,
                                max_position_embeddings=96)


def test_prompt_longer_than_the_window_is_refused(ckpt):
    m = moetier.load(ckpt, tokenizer=False)
    assert m.context_limit == 96
    with pytest.raises(MoetierError, match=r"the prompt is 97 tokens, longer than the model's context window of 96"):
        m.generate_ids(list(range(3, 100)), 4)
    res = m.generate_ids(list(range(3, 93)), 50)  # 90 prompt tokens: room for 6 more positions
    assert res.finish_reason == "length" and 0 < len(res.ids) <= 6


def test_budgeted_context_bounds_the_sequence(ckpt):
    m = tiered.load(ckpt, max_ram="2G", context=32, tokenizer=False)
    try:
        assert m.memory_budget.context == 32 and m.context_limit == 32
        with pytest.raises(MoetierError, match=r"the prompt is 40 tokens, longer than the --context 32 tokens"):
            m.generate_ids(list(range(3, 43)), 4)
        seen = []
        res = m.generate_ids(list(range(3, 23)), 100, on_token=seen.append)  # 20 + at most 12
        assert res.finish_reason == "length" and len(res.ids) <= 12
        assert 20 + len(res.ids) - 1 <= 32  # positions fed to the model stay within the reserved KV
    finally:
        m.hierarchy.close()


def test_context_beyond_the_window_is_refused(ckpt):
    with pytest.raises(MoetierError, match=r"--context 4096: expected 1\.\.96 tokens"):
        tiered.load(ckpt, max_ram="2G", context=4096, tokenizer=False)


def test_budget_reserves_kv_for_the_window_by_default(ckpt):
    m = tiered.load(ckpt, max_ram="2G", tokenizer=False)
    try:
        assert m.memory_budget.context == 96  # not 4096: the model cannot use more
    finally:
        m.hierarchy.close()


def test_context_alone_does_not_switch_to_the_hierarchy(ckpt):
    m = moetier.load(ckpt, tokenizer=False, context=40)
    assert m.context_limit == 40 and getattr(m, "hierarchy", None) is None
    with pytest.raises(MoetierError, match=r"the prompt is 41 tokens, longer than the --context 40 tokens; "):
        m.generate_ids(list(range(3, 44)), 1)
    with pytest.raises(MoetierError, match=r"--context 0: expected 1\.\.96"):
        moetier.load(ckpt, tokenizer=False, context=0)


def test_max_tokens_zero_still_prefills_and_reports_it(ckpt):
    m = moetier.load(ckpt, tokenizer=False)
    res = m.generate_ids(list(range(3, 40)), 0)
    assert res.ids == [] and res.prefill_s > 0 and res.prefill_tokens_per_s > 0
