"""Routed-expert FFN: router, expert-grouped dispatch through an ExpertProvider.

The flat token batch ``x [T, H]`` is routed (``topk_ids [T, k]``, ``topk_weights [T, k]``),
routing observers see the result, then the tokens are grouped by expert: each needed
expert is announced once (``provider.require``), fetched once (``provider.get``) and
applied to all its tokens in one matmul, so tokens of different requests that picked the
same expert share the weight read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moetier.layers.linear import linear
from moetier.layers.mlp import GatedMLP, activation

if TYPE_CHECKING:
    from moetier.layers.experts import ExpertProvider, ExpertWeights

SMALL_ROWS = 4  # bf16 expert matmuls with at most this many rows bypass oneDNN

RouterObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class SoftmaxTopKRouter(nn.Module):
    """Linear router -> softmax (float32) -> top-k, optionally renormalised and scaled.

    Weight name ``weight`` [E, H], so ``mlp.gate.weight`` in the checkpoint maps to it.
    """

    def __init__(self, hidden: int, n_experts: int, top_k: int, norm_topk_prob: bool,
                 scaling: float = 1.0, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.bias = nn.Parameter(torch.empty(n_experts)) if bias else None
        self.top_k, self.norm_topk_prob, self.scaling = top_k, norm_topk_prob, scaling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_ids [T, k] int64, topk_weights [T, k] (x's dtype)."""
        logits = F.linear(x, self.weight, self.bias)  # [T, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            w = w * self.scaling
        return ids, w.to(x.dtype)


GluFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate_out, up_out) -> hidden


def swiglu(act: Callable[[torch.Tensor], torch.Tensor]) -> GluFn:
    return lambda g, u: act(g) * u


def expert_forward(x: torch.Tensor, ew: ExpertWeights, glu: GluFn) -> torch.Tensor:
    """One expert on its tokens: x [n, H] -> [n, H]. Quantized weights are dequantized here,
    per use (the torch path; see moetier.layers.linear.linear)."""
    if ew.split is not None:
        g = linear(x, ew.split[0], ew.gate_bias)  # [n, I]
        u = linear(x, ew.split[1], ew.up_bias)  # [n, I]
    else:
        assert ew.gate_up is not None
        gu = linear(x, ew.gate_up, ew.gate_up_bias)  # [n, 2I]
        g, u = gu.chunk(2, dim=-1)
    return linear(glu(g, u), ew.down, ew.down_bias)


def dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    layer: int,
    provider: ExpertProvider,
    glu: GluFn,
) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * expert(x), grouped by expert."""
    T, k = topk_ids.shape
    out = torch.zeros_like(x)
    if T == 1:  # decode fast path: no sorting, one host sync
        ids, ws = topk_ids[0].tolist(), topk_weights[0].tolist()
        provider.require(layer, sorted(set(ids)))
        for e, w in zip(ids, ws):
            out.add_(expert_forward(x, provider.get(layer, e), glu), alpha=w)
        return out
    flat = topk_ids.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    experts = [e for e, c in enumerate(counts) if c]
    provider.require(layer, experts)
    tok = order // k  # token row of each sorted assignment
    w_sorted = topk_weights.reshape(-1)[order]
    # bf16 matmuls of a few rows are much faster in ATen than in oneDNN (see models/base.py)
    bf16 = x.dtype == torch.bfloat16 and torch._C._get_mkldnn_enabled()
    start = 0
    for e in experts:
        n = counts[e]
        rows = tok[start : start + n]
        if bf16 and n <= SMALL_ROWS:
            torch._C._set_mkldnn_enabled(False)
            try:
                y = expert_forward(x[rows], provider.get(layer, e), glu)  # [n, H]
            finally:
                torch._C._set_mkldnn_enabled(True)
        else:
            y = expert_forward(x[rows], provider.get(layer, e), glu)  # [n, H]
        out.index_add_(0, rows, y * w_sorted[start : start + n, None])
        start += n
    return out


class MoEBlock(nn.Module):
    """Router + routed experts (via provider) + optional shared expert (and its sigmoid gate).

    Parameter names follow the HF checkpoints: ``gate`` (router), ``shared_expert``,
    ``shared_expert_gate``. The routed experts are not parameters.
    """

    def __init__(self, layer: int, router: nn.Module, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, glu: GluFn | None = None, act: str = "silu"):
        super().__init__()
        self.layer = layer
        self.gate = router
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.glu = glu or swiglu(activation(act))
        # set by the model after loading (not modules, not parameters)
        self.provider: ExpertProvider | None = None
        self.observers: list[RouterObserver] = []

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.route(x)
        for fn in self.observers:
            fn(self.layer, ids, w)
        assert self.provider is not None, "MoEBlock used before an ExpertProvider was attached"
        out = dispatch(x, ids, w, self.layer, self.provider, self.glu)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        return out


def shared_mlp(hidden: int, inter: int, act: str) -> GatedMLP:
    return GatedMLP(hidden, inter, act)
