from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moetier.traces.format import make_trace

DATA = Path("/work/shared/data/routing-traces")
QWEN = {layer: DATA / f"qwen1.5-moe-a2.7b-chat.gsm8k.layer{layer}.jsonl" for layer in (0, 8, 12)}
OLMOE = DATA / "olmoe-1b-7b-0924.gsm8k.layer0.jsonl"
SWITCH = DATA / "switch-base-8.router-trace.json"

needs_data = pytest.mark.skipif(not OLMOE.exists(), reason="shared routing traces not present")


def small_trace(rows: int = 200, experts: int = 8, k: int = 2, layers: int = 2, seed: int = 0):
    """A synthetic multi-layer trace: one request, token-major rows."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, experts + 1) ** 1.1
    p /= p.sum()
    ids = np.stack([rng.choice(experts, size=k, replace=False, p=p) for _ in range(rows * layers)])
    w = rng.random(ids.shape).astype(np.float32)
    layer = np.tile(np.arange(layers), rows)
    pos = np.repeat(np.arange(rows), layers)
    return make_trace(topk_ids=ids, topk_weights=w, layer=layer, position=pos,
                      meta={"model": "synthetic", "num_experts": experts})


@pytest.fixture
def trace():
    return small_trace()
