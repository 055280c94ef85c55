"""Grouped-query attention over a flat token batch, with a per-sequence KV cache.

The flat batch is described by ``segments``: one ``(sequence, start, length)`` per sequence,
giving the rows of the flat ``[T, ...]`` tensors that belong to it. Projections, q/k norms
and rope run on the whole flat batch; only the score/softmax/value step runs per sequence.

Each :class:`Sequence` owns ``layers[i]``, the cache state of decoder layer ``i`` (its
format belongs to that layer's attention module). ``Sequence.length`` counts the tokens
already in the cache; the model advances it after a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetier.layers.norm import RMSNorm, rms_norm
from moetier.layers.rope import apply_rope


@dataclass(eq=False)
class Sequence:
    """One sequence's decoding state: cached tokens and per-layer KV cache."""

    num_layers: int
    capacity: int = 0  # preallocation hint for the KV cache (tokens)
    length: int = 0  # tokens already in the cache
    layers: list[Any] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # all tokens fed so far

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    def reset(self) -> None:
        self.length = 0
        self.tokens.clear()


Segments = list[tuple[Sequence, int, int]]  # (sequence, start row in the flat batch, n tokens)


def cache_reserve(seq: Sequence, layer: int, like: tuple[torch.Tensor, ...], need: int,
                  time_dim: int = 1) -> tuple[torch.Tensor, ...]:
    """Make ``seq``'s cache buffers for ``layer`` hold at least ``need`` tokens.

    ``like``: one tensor per buffer giving the shape (any length along ``time_dim``) and dtype.
    Buffers are preallocated to ``seq.capacity`` and doubled when full (amortised O(1)); the
    first ``seq.length`` tokens are kept. Returns the whole buffers.
    """
    pos = seq.length
    bufs = seq.layers[layer]
    if bufs is None or bufs[0].shape[time_dim] < need:
        old_cap = 0 if bufs is None else bufs[0].shape[time_dim]
        cap = max(need, seq.capacity, 2 * old_cap, 16)
        fresh = []
        for i, t in enumerate(like):
            shape = list(t.shape)
            shape[time_dim] = cap
            b = t.new_empty(shape)
            if bufs is not None and pos:
                b.narrow(time_dim, 0, pos).copy_(bufs[i].narrow(time_dim, 0, pos))
            fresh.append(b)
        bufs = tuple(fresh)
        seq.layers[layer] = bufs
    return bufs


def cache_append(
    seq: Sequence, layer: int, new: tuple[torch.Tensor, ...], time_dim: int = 1
) -> tuple[torch.Tensor, ...]:
    """Append ``new`` tensors (time along ``time_dim``) to ``seq``'s cache for ``layer``.

    Returns views of the cached prefix, including the new tokens.
    """
    pos, n = seq.length, new[0].shape[time_dim]
    need = pos + n
    bufs = cache_reserve(seq, layer, new, need, time_dim)
    for b, t in zip(bufs, new):
        b.narrow(time_dim, pos, n).copy_(t)
    return tuple(b.narrow(time_dim, 0, need) for b in bufs)


def causal_mask(
    q_pos0: int, n: int, total: int, window: int | None = None, device: Any = None
) -> torch.Tensor | None:
    """Boolean mask [n, total] (True = attend) for queries at q_pos0..q_pos0+n-1; None if not needed."""
    if n == 1 and (window is None or total <= window):
        return None
    q = torch.arange(q_pos0, q_pos0 + n, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


class Attention(nn.Module):
    """Multi-head attention with GQA, optional q/k norm ("head" or "full") and biases."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str = "none",
        eps: float = 1e-6,
        sliding_window: int | None = None,
        clip_qkv: float | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(n_heads * head_dim, eps), RMSNorm(n_kv_heads * head_dim, eps)
        self.sliding_window = sliding_window
        self.clip_qkv = clip_qkv
        self.scale = scale if scale is not None else head_dim**-0.5
        # built by fuse_projections() after loading (plain attributes: not in the state dict)
        self.qkv_weight: torch.Tensor | None = None  # [(H + 2 KV) * D, hidden]
        self.qkv_bias: torch.Tensor | None = None
        self.qk_norm_weight: torch.Tensor | None = None  # [H + KV, D] (qk_norm == "head")

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Store q/k/v_proj weights as row blocks of ONE tensor (the parameters become views
        of it, no extra memory) so a step runs one projection instead of three; with per-head
        q/k norms, also build the stacked norm weight so q and k are normed and rotated together.
        Each output is the same dot product as before (decode: bit-identical, checked on the
        synthetic bench model; a GEMM may block a taller matrix differently)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if any(not isinstance(p, nn.Linear) or p.weight.is_meta for p in projs):
            return  # quantized projections (QLinear) stay separate, in their stored format
        sizes = [p.weight.shape[0] for p in projs]
        self.qkv_weight = torch.cat([p.weight for p in projs])
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([p.bias for p in projs])
        for p, w in zip(projs, self.qkv_weight.split(sizes)):
            p.weight = nn.Parameter(w, requires_grad=False)
        if self.qkv_bias is not None:
            for p, b in zip(projs, self.qkv_bias.split(sizes)):
                p.bias = nn.Parameter(b, requires_grad=False)
        if self.qk_norm == "head":
            H, KV, D = self.n_heads, self.n_kv, self.head_dim
            self.qk_norm_weight = torch.cat([self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(KV, D)])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments, layer: int
    ) -> torch.Tensor:
        T = x.shape[0]
        H, D = self.n_heads, self.head_dim
        if self.qkv_weight is not None and self.clip_qkv is None and self.qk_norm != "full":
            q, k, v = self._qkv_fused(x, cos, sin)
        else:
            q, k, v = self._qkv(x, cos, sin)
        if len(segments) == 1:
            seq, _, n = segments[0]
            out = self._attend(seq, layer, q, k, v).reshape(T, H * D)
        else:
            out = x.new_empty(T, H * D)
            for seq, s, n in segments:
                out[s : s + n] = self._attend(seq, layer, q[s : s + n], k[s : s + n], v[s : s + n]).reshape(
                    n, H * D
                )
        return self.o_proj(out)

    def _qkv_fused(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One projection; q and k heads normed (per head) and rotated as one [T, H + KV, D]."""
        T, H, KV, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(T, H + 2 * KV, D)
        qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
        if self.qk_norm_weight is not None:
            qk = rms_norm(qk, self.qk_norm_weight, self.q_norm.eps)
        qk = apply_rope(qk, cos, sin)
        return qk[:, :H], qk[:, H:], v

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*D], [T, KV*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(
        self, seq: Sequence, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [n, H, D], k/v [n, KV, D] for one sequence -> [n, H, D]."""
        n = q.shape[0]
        K, V = cache_append(seq, layer, (k.transpose(0, 1), v.transpose(0, 1)))  # [KV, L, D]
        mask = causal_mask(seq.length, n, K.shape[1], self.sliding_window)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], K[None], V[None], attn_mask=mask, scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv,
        )  # [1, H, n, D]
        return o[0].transpose(0, 1)
