from __future__ import annotations

import numpy as np
import pytest

from moetier.errors import MoetierError
from moetier.traces.format import DECODE, PREFILL, load_trace, save_trace
from moetier.traces.record import TraceRecorder, read_prompts, record_trace


class FakeSpec:
    name = "fake-moe"
    num_experts = 4
    raw = {"model_type": "fake"}


class FakeModel:
    """Calls its router observers like the runtime: per MoE layer, once per forward pass."""

    spec = FakeSpec()

    def __init__(self, layers=(1, 3)):
        self.layers = layers
        self.observers = []

    def add_router_observer(self, fn):
        self.observers.append(fn)

    def remove_router_observer(self, fn):
        self.observers.remove(fn)

    def generate(self, prompt, max_tokens, temperature=0.0, **kw):
        t = len(prompt.split())
        for n in [t] + [1] * (max_tokens - 1):
            for layer in self.layers:
                ids = np.stack([np.array([layer % 4, (layer + 1 + i) % 4]) for i in range(n)])
                for fn in self.observers:
                    fn(layer, ids, np.full((n, 2), 0.5, np.float32))
        return "out"


def test_record_trace_positions_phases(tmp_path):
    m = FakeModel()
    t = record_trace(m, ["a b c", "d e"], max_tokens=3, prompt_set="unit")
    assert m.observers == []  # observer removed
    # request 0: 3 prefill + 2 decode tokens, request 1: 2 + 2, for each of 2 layers
    assert len(t) == (5 + 4) * 2
    r0 = t.select((t.request == 0) & (t.layer == 3))
    assert r0.position.tolist() == [0, 1, 2, 3, 4]
    assert r0.phase.tolist() == [PREFILL] * 3 + [DECODE] * 2
    assert r0.step.tolist() == [0, 0, 0, 1, 2]
    assert t.layers == [1, 3] and t.meta["model"] == "fake-moe" and t.meta["prompt_set"] == "unit"
    assert t.meta["requests"] == ["r0", "r1"] and len(t.meta["config_hash"]) == 64
    t2 = load_trace(save_trace(t, tmp_path / "rec.npz"))
    assert np.array_equal(t2.topk_ids, t.topk_ids)


def test_recorder_rejects_bad_shapes():
    rec = TraceRecorder()
    rec(0, np.zeros((2, 2), int), np.zeros((2, 2)))
    with pytest.raises(MoetierError, match="shape"):
        rec(0, np.zeros((2, 2), int), np.zeros((3, 2)))
    with pytest.raises(MoetierError, match="k changed"):
        rec(0, np.zeros((2, 3), int), np.zeros((2, 3)))
    with pytest.raises(MoetierError, match="no routing"):
        TraceRecorder().to_trace()


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text('hello there\n\n{"prompt": "x"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert read_prompts(p) == ["hello there", "x", [{"role": "user", "content": "hi"}]]
    p.write_text('{"nope": 1}\n')
    with pytest.raises(MoetierError, match=r"p\.txt:1"):
        read_prompts(p)
    with pytest.raises(MoetierError, match="no such"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.slow
def test_record_from_the_runtime(tmp_path):
    pytest.importorskip("transformers")
    from moetier.cli import main
    from moetier.spec import load_spec
    from tests.helpers.checkpoints import make_tiny_checkpoint

    d = make_tiny_checkpoint(tmp_path, "qwen3_moe", seed=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe cat sat\n")
    out = tmp_path / "rec.npz"
    assert main(["trace", str(d), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "3"]) == 0
    t = load_trace(out)
    spec = load_spec(d)
    assert t.layers == [i for i, moe in enumerate(spec.moe_layers) if moe]
    assert t.num_experts == spec.num_experts and t.top_k == spec.top_k
    assert t.meta["requests"] == ["r0", "r1"]
    for r in (0, 1):
        for layer in t.layers:
            s = t.select((t.request == r) & (t.layer == layer))
            assert s.position.tolist() == list(range(len(s)))
            n_prefill = int((s.phase == PREFILL).sum())
            assert n_prefill >= 2 and s.phase[n_prefill:].tolist() == [DECODE] * (len(s) - n_prefill)
            assert len(s) - n_prefill <= 2  # max_tokens=3: the first token comes from the prefill
    w = t.topk_weights
    assert np.isfinite(w).all() and (w >= 0).all()
