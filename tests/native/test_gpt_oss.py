"""Native gpt-oss decode (sinks, alternating sliding window, clamped SwiGLU with biases, the
top-k-then-softmax router) against the torch path: float32 <= 1e-4 max |dlogit| over a
40-token prefill (torch) and 16 native greedy steps past the window, same tokens; MXFP4
experts; thread-count and provider independence."""

from __future__ import annotations

import pytest
import torch

import moetier
import tests.helpers.moe_families  # noqa: F401  (registers the gpt_oss recipe)
from tests.native.common import ckpt_fixture, greedy_steps

PROMPT = [(5 * i + 1) % 250 + 2 for i in range(40)]
STEPS = 16

CONFIGS = {
    "window8": {},  # sliding_window 8 on alternating layers, YaRN rope, attention biases
    "window3_top3": dict(sliding_window=3, num_experts_per_tok=3, num_hidden_layers=3),
}


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py

ckpt = ckpt_fixture(CONFIGS, "gpt_oss")


def greedy(model, prompt, steps):
    return greedy_steps(model, prompt, steps, first=7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_gpt_oss_matches_torch(lib, ckpt, name):
    from moetier.native.gpt_oss import GptOssDecoder

    m = moetier.load(ckpt(name), tokenizer=False, dtype="float32")
    t = moetier.load(ckpt(name), tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None and isinstance(m.net.native, GptOssDecoder)
    windows = [d.window for d in m.net.native.descs]
    assert 0 in windows and any(w > 0 for w in windows)  # alternating sliding / full attention
    assert all(d.sinks and d.q_b and d.o_b for d in m.net.native.descs)
    assert m.net.native.descs[0].limit == pytest.approx(7.0) and m.net.native.descs[0].alpha == pytest.approx(1.702)
    got, gt = greedy(m, PROMPT, STEPS)
    want, wt = greedy(t, PROMPT, STEPS)
    assert gt == wt
    assert (got - want).abs().max().item() <= 1e-4
    assert m.compute_paths()["decode"] == {"path": "native", "reason": None, "steps": STEPS}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_count_and_provider_independent(lib, ckpt, dtype):
    m = moetier.load(ckpt("window8"), tokenizer=False, dtype=dtype)
    h = moetier.load(ckpt("window8"), tokenizer=False, dtype=dtype, expert_cache=0.25)
    assert h.native_reason is None
    before = torch.get_num_threads()
    try:
        runs = {}
        for nth in (1, 3):
            torch.set_num_threads(nth)
            runs[nth] = greedy(m, [], 12)[0]  # native steps only
        tiered = greedy(h, [], 12)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[1], runs[3]) and torch.equal(runs[1], tiered)


def test_mxfp4_experts_native(lib, tmp_path):
    """The MXFP4 release layout (experts as blocks + scales, gate/up interleaved row views) decodes natively."""
    from tests.helpers.quantized import make_quantized_checkpoint

    ck = make_quantized_checkpoint(tmp_path, "gpt_oss", "mxfp4", tokenizer=False, num_hidden_layers=2)
    m = moetier.load(ck, tokenizer=False, dtype="float32")
    t = moetier.load(ck, tokenizer=False, dtype="float32", native=False)
    assert m.native_reason is None
    got, gt = greedy(m, PROMPT[:32], STEPS)
    want, wt = greedy(t, PROMPT[:32], STEPS)
    assert gt == wt and (got - want).abs().max().item() <= 1e-4
