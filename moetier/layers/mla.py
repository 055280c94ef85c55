"""DeepSeek Multi-head Latent Attention (MLA), DeepSeek-V2 / V3 / Kimi-K2.

Per token, MLA projects the hidden state down to a small latent ``c_kv`` (``kv_lora_rank``
wide, RMS-normed) plus one shared rotary key ``k_rot`` (``qk_rope_head_dim`` wide). Keys and
values of every head are linear up-projections of ``c_kv`` (``kv_b_proj``), so the KV cache
only needs ``c_kv`` and ``k_rot``: ``kv_lora_rank + qk_rope_head_dim`` numbers per token and
layer, whatever the head count.

Queries come either straight from the hidden state (``q_proj``, DeepSeek-V2-Lite) or through
their own low-rank bottleneck (``q_a_proj -> q_a_layernorm -> q_b_proj``, ``q_lora_rank``).
Each query/key head is ``[nope | rope]``: ``qk_nope_head_dim`` position-free dims that meet
the up-projected key, and ``qk_rope_head_dim`` rotary dims that meet the shared ``k_rot``.

We attend in the *absorbed* form: instead of expanding the cached latents into per-head keys
and values, the key up-projection is folded into the query and the value up-projection is
applied after the softmax::

    score[h, t, s] = (q_nope[t, h] @ W_uk[h]) . c_kv[s]  +  q_rot[t, h] . k_rot[s]
    out[t, h]      = (sum_s p[h, t, s] c_kv[s]) @ W_uv[h]^T

which is exact (``kv_b_proj`` has no bias) and never materialises ``[S, heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetier.errors import ConfigError
from moetier.layers.attention import Segments, cache_append
from moetier.layers.norm import RMSNorm, rms_norm
from moetier.layers.rope import apply_rope, yarn_get_mscale
from moetier.quant import QTensor, dense


def mla_softmax_scale(qk_head_dim: int, rope_scaling: Mapping[str, Any] | None) -> float:
    """``1/sqrt(qk_nope + qk_rope)``, times ``mscale(factor, mscale_all_dim)**2`` under YaRN.

    DeepSeek folds the YaRN temperature into the softmax scale (both q and k would carry one
    ``mscale_all_dim`` factor); the ``mscale / mscale_all_dim`` ratio goes onto cos/sin
    instead (``layers.rope.rope_frequencies``).
    """
    scale = qk_head_dim**-0.5
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if kind != "default" and mscale_all_dim:
            factor = rope_scaling.get("factor")
            if not isinstance(factor, (int, float)):
                raise ConfigError(
                    f"config.json: field 'rope_scaling.factor' must be a number when "
                    f"mscale_all_dim is set, got {factor!r}"
                )
            m = yarn_get_mscale(float(factor), float(mscale_all_dim))
            scale = scale * m * m
    return scale


@dataclass
class MLAWeights:
    """One layer's MLA tensors, in the on-disk (``nn.Linear``: [out, in]) layout."""

    kv_a_proj: Tensor  # [C + dr, H]   (kv_a_proj_with_mqa)
    kv_a_norm: Tensor  # [C]
    kv_b_proj: Tensor  # [heads * (dn + dv), C]
    o_proj: Tensor  # [H, heads * dv]
    q_proj: Tensor | None = None  # [heads * (dn + dr), H]   (no q_lora_rank)
    q_a_proj: Tensor | None = None  # [Rq, H]
    q_a_norm: Tensor | None = None  # [Rq]
    q_b_proj: Tensor | None = None  # [heads * (dn + dr), Rq]
    q_a_proj_bias: Tensor | None = None  # attention_bias=True only
    kv_a_proj_bias: Tensor | None = None
    o_proj_bias: Tensor | None = None


@dataclass(frozen=True)
class MLAShape:
    num_heads: int
    kv_lora_rank: int  # C
    qk_nope_head_dim: int  # dn
    qk_rope_head_dim: int  # dr
    v_head_dim: int  # dv
    eps: float  # q_a_layernorm / kv_a_layernorm epsilon
    interleaved_rope: bool  # pairs (DeepSeek default) or halves (rope_interleave=false)
    softmax_scale: float


def mla_project(
    x: Tensor, w: MLAWeights, shape: MLAShape, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Queries and the cacheable latents of T new tokens.

    x: [T, H]; cos, sin: [T, dr] for the tokens' positions (``layers.rope.Rotary``).
    Returns q_nope [T, heads, dn], q_rot [T, heads, dr] (rotated),
    c_kv [T, C] (normed latent, cache it), k_rot [T, dr] (rotated shared key, cache it).
    """
    T = x.shape[0]
    nh, dn, dr, C = shape.num_heads, shape.qk_nope_head_dim, shape.qk_rope_head_dim, shape.kv_lora_rank
    if w.q_proj is not None:
        q = F.linear(x, w.q_proj)
    else:
        assert w.q_a_proj is not None and w.q_a_norm is not None and w.q_b_proj is not None
        q = F.linear(rms_norm(F.linear(x, w.q_a_proj, w.q_a_proj_bias), w.q_a_norm, shape.eps), w.q_b_proj)
    q = q.view(T, nh, dn + dr)
    q_nope, q_rot = q.split([dn, dr], dim=-1)

    ckv = F.linear(x, w.kv_a_proj, w.kv_a_proj_bias)  # [T, C + dr]
    c_kv, k_rot = ckv.split([C, dr], dim=-1)
    c_kv = rms_norm(c_kv, w.kv_a_norm, shape.eps)  # [T, C]

    # interleaved rope returns the rotated pairs de-interleaved; q and k alike, so q.k is unchanged
    q_rot = apply_rope(q_rot, cos, sin, shape.interleaved_rope)  # [T, heads, dr]
    k_rot = apply_rope(k_rot[:, None, :], cos, sin, shape.interleaved_rope)[:, 0, :]  # [T, dr]
    return q_nope, q_rot, c_kv.contiguous(), k_rot.contiguous()


def mla_attend(
    q_nope: Tensor,
    q_rot: Tensor,
    c_kv: Tensor,
    k_rot: Tensor,
    w: MLAWeights,
    shape: MLAShape,
    q_pos: Tensor,
) -> Tensor:
    """Causal MLA over the cached latents, absorbed form; returns o_proj output [T, H].

    q_nope [T, heads, dn], q_rot [T, heads, dr]: the new tokens' queries, at positions q_pos [T].
    c_kv [S, C], k_rot [S, dr]: latents of positions 0..S-1 (the new tokens included).
    """
    T, nh = q_nope.shape[0], shape.num_heads
    dn, dv, C = shape.qk_nope_head_dim, shape.v_head_dim, shape.kv_lora_rank
    S = c_kv.shape[0]
    wkv = w.kv_b_proj.view(nh, dn + dv, C)
    w_uk, w_uv = wkv[:, :dn, :], wkv[:, dn:, :]  # [heads, dn, C], [heads, dv, C]

    q_lat = torch.einsum("thd,hdc->htc", q_nope, w_uk)  # [heads, T, C]
    scores = q_lat @ c_kv.T  # [heads, T, S]
    scores = scores + torch.einsum("thr,sr->hts", q_rot, k_rot)
    scores = scores * shape.softmax_scale
    k_pos = torch.arange(S, device=q_pos.device)
    mask = k_pos[None, :] > q_pos[:, None]  # [T, S] future keys
    scores = scores.masked_fill(mask, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(c_kv.dtype)  # [heads, T, S]
    o_lat = p @ c_kv  # [heads, T, C]
    out = torch.einsum("htc,hvc->thv", o_lat, w_uv).reshape(T, nh * dv)  # [T, heads * dv]
    return F.linear(out, w.o_proj, w.o_proj_bias)  # [T, H]


def kv_b_from_parts(k_b: Tensor | QTensor, v_b: Tensor | QTensor, num_heads: int) -> Tensor:
    """HF's ``kv_b_proj`` weight [nh (dn + dv), C] in float32 from llama.cpp's per-head parts:
    ``attn_k_b`` [nh C, dn] (W_UK[h] transposed) and ``attn_v_b`` [nh dv, C], as stored."""
    kb = dense(k_b, torch.float32).reshape(num_heads, -1, k_b.shape[-1])  # [nh, C, dn]
    vb = dense(v_b, torch.float32).reshape(num_heads, -1, v_b.shape[-1])  # [nh, dv, C]
    return torch.cat([kb.transpose(1, 2), vb], dim=1).reshape(-1, vb.shape[-1])  # [nh (dn + dv), C]


class SplitKVB(nn.Module):
    """``kv_b_proj`` kept as GGUF stores it: llama.cpp's per-head ``attn_k_b`` (W_UK[h]
    transposed) and ``attn_v_b`` (W_UV[h]) as stored (block formats as QTensors, or plain
    float16 / bfloat16 / float32), never rebuilt as one model-dtype matrix. ``k_b`` [nh C, dn]
    (head h: rows h C .. + C), ``v_b`` [nh dv, C]. :attr:`weight`
    is the dequantized ``[nh (dn + dv), C]`` (a new tensor per access, as ``QLinear.weight``);
    the native decoder runs the absorb and W_UV as products over the stored rows
    (``native/mla.py``)."""

    def __init__(self, k_b: Tensor | QTensor, v_b: Tensor | QTensor, num_heads: int, dtype: torch.dtype):
        super().__init__()
        (kr, dn), (vr, C) = tuple(k_b.shape), tuple(v_b.shape)
        dv = vr // num_heads
        if kr != num_heads * C or vr != num_heads * dv:
            raise ValueError(f"SplitKVB: k_b {list(k_b.shape)} / v_b {list(v_b.shape)} for {num_heads} heads")
        self.k_b, self.v_b, self.num_heads, self.compute_dtype = k_b, v_b, num_heads, dtype
        self.in_features, self.out_features = C, num_heads * (dn + dv)

    @property
    def weight(self) -> Tensor:
        return kv_b_from_parts(self.k_b, self.v_b, self.num_heads).to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k_b={self.k_b.dtype}, v_b={self.v_b.dtype}")


class MLAAttention(nn.Module):
    """MLA with the per-sequence latent cache; parameter names match the HF checkpoints.

    Cache per sequence and layer: ``c_kv`` [L, kv_lora_rank] and ``k_rot`` [L, qk_rope_head_dim].
    """

    def __init__(self, hidden: int, shape: MLAShape, q_lora_rank: int | None, bias: bool = False):
        super().__init__()
        nh, dn, dr, dv, C = (shape.num_heads, shape.qk_nope_head_dim, shape.qk_rope_head_dim,
                             shape.v_head_dim, shape.kv_lora_rank)
        self.shape = shape
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, nh * (dn + dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, shape.eps)
            self.q_b_proj = nn.Linear(q_lora_rank, nh * (dn + dr), bias=False)
        self.q_lora_rank = q_lora_rank
        self.kv_a_proj_with_mqa = nn.Linear(hidden, C + dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(C, shape.eps)
        self.kv_b_proj = nn.Linear(C, nh * (dn + dv), bias=False)
        self.o_proj = nn.Linear(nh * dv, hidden, bias=bias)

    def weights(self) -> MLAWeights:
        lora = self.q_lora_rank is not None
        return MLAWeights(
            kv_a_proj=self.kv_a_proj_with_mqa.weight, kv_a_norm=self.kv_a_layernorm.weight,
            kv_b_proj=self.kv_b_proj.weight, o_proj=self.o_proj.weight,
            q_proj=None if lora else self.q_proj.weight,
            q_a_proj=self.q_a_proj.weight if lora else None,
            q_a_norm=self.q_a_layernorm.weight if lora else None,
            q_b_proj=self.q_b_proj.weight if lora else None,
            q_a_proj_bias=self.q_a_proj.bias if lora else None,
            kv_a_proj_bias=self.kv_a_proj_with_mqa.bias, o_proj_bias=self.o_proj.bias,
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Segments, layer: int) -> Tensor:
        """x [T, H] (flat batch) -> [T, H]; appends the new latents to each sequence's cache."""
        w = self.weights()
        q_nope, q_rot, c_kv, k_rot = mla_project(x, w, self.shape, cos, sin)
        outs = []
        for seq, s, n in segments:
            C, R = cache_append(seq, layer, (c_kv[s : s + n], k_rot[s : s + n]), time_dim=0)  # [L, C], [L, dr]
            q_pos = torch.arange(seq.length, seq.length + n)
            outs.append(mla_attend(q_nope[s : s + n], q_rot[s : s + n], C, R, w, self.shape, q_pos))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
