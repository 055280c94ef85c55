"""Llama-4 (text): NoPE layers, chunked attention, L2 q/k norm, sigmoid top-1 router that
scales the expert *input*, one shared expert per MoE layer.

* ``no_rope_layers[i] == 1`` means layer i uses RoPE (interleaved pairs) and, by default,
  chunked attention (keys in the query's ``attention_chunk_size`` block only); the other
  layers are NoPE with full attention. ``layer_types`` (if present) names the mask.
* RoPE layers with ``use_qk_norm`` L2-normalise q and k per head after the rotation (an
  RMS norm without weight, eps ``rms_norm_eps``).
* NoPE layers with ``attn_temperature_tuning`` scale q by
  ``1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))``.
* MoE (``moe_layers`` / ``interleave_moe_layer_step``): router ``feed_forward.router``
  picks the top-k logits and scores them with a sigmoid; each expert sees ``x * score``
  (the score multiplies the input, not the output), plus ``feed_forward.shared_expert(x)``.
  Experts are fused ``experts.gate_up_proj [E, H, 2I]`` (gate half, up half) and
  ``experts.down_proj [E, I, H]``, split per expert by the loader.
* Both ``Llama4ForCausalLM`` (``model.*``) and the text part of
  ``Llama4ForConditionalGeneration`` (``language_model.model.*``) checkpoints load; the
  vision tower is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetier.layers.attention import Attention, Segments, Sequence, cache_append, causal_mask
from moetier.layers.mlp import GatedMLP
from moetier.layers.moe import MoEBlock, dispatch
from moetier.layers.rope import apply_rope
from moetier.models._fused_experts import TransposedFusedExpertReader
from moetier.models.base import DecoderLM, ExpertReader
from moetier.models.registry import register
from moetier.weights.safetensors_io import SafetensorsIndex


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim (no weight), statistics in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4Attention(Attention):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool, eps: float,
                 use_rope: bool, qk_l2_norm: bool, chunk_size: int | None,
                 temperature: tuple[float, float] | None):
        super().__init__(hidden, n_heads, n_kv_heads, head_dim, qkv_bias=bias, o_bias=bias, eps=eps)
        self.use_rope, self.qk_l2_norm, self.eps = use_rope, qk_l2_norm, eps
        self.chunk_size = chunk_size
        self.temperature = temperature  # (floor_scale, attn_scale) on NoPE layers, else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Segments, layer: int) -> Tensor:
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        q = self.q_proj(x).view(T, H, D)
        k = self.k_proj(x).view(T, KV, D)
        v = self.v_proj(x).view(T, KV, D)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
            if self.qk_l2_norm:
                q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        elif self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            pos = torch.cat([torch.arange(seq.length, seq.length + n) for seq, _, n in segments])  # [T]
            scale = torch.log1p(torch.floor((pos.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        out = torch.cat([self._attend(seq, layer, q[s : s + n], k[s : s + n], v[s : s + n]).reshape(n, H * D)
                         for seq, s, n in segments])
        return self.o_proj(out)

    def _attend(self, seq: Sequence, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [n, H, D], k/v [n, KV, D] for one sequence -> [n, H, D]."""
        n = q.shape[0]
        K, V = cache_append(seq, layer, (k.transpose(0, 1), v.transpose(0, 1)))  # [KV, L, D]
        L = K.shape[1]
        if self.chunk_size is None:
            mask = causal_mask(seq.length, n, L)
        else:  # causal and within the query's chunk
            qp = torch.arange(seq.length, seq.length + n)[:, None]
            kp = torch.arange(L)[None, :]
            mask = (kp <= qp) & (kp // self.chunk_size == qp // self.chunk_size)  # [n, L]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], K[None], V[None], attn_mask=mask, scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv,
        )  # [1, H, n, D]
        return o[0].transpose(0, 1)


class Llama4Router(nn.Module):
    """``weight`` [E, H]: top-k of the logits, each scored by a sigmoid (no renormalisation)."""

    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.top_k = top_k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        top, ids = F.linear(x, self.weight).topk(self.top_k, dim=-1)  # [T, k]
        return ids, torch.sigmoid(top.float()).to(x.dtype)


class Llama4MoE(MoEBlock):
    """Shared expert + routed experts applied to the score-scaled input."""

    def forward(self, x: Tensor) -> Tensor:
        ids, w = self.route(x)
        for fn in self.observers:
            fn(self.layer, ids, w)
        assert self.provider is not None, "MoEBlock used before an ExpertProvider was attached"
        assert self.shared_expert is not None
        T, k = ids.shape
        # one row per (choice, token): input x * score, one expert, output weight 1
        xs = (w.T[:, :, None] * x[None]).reshape(k * T, -1)  # [k*T, H]
        routed = dispatch(xs, ids.T.reshape(k * T, 1), torch.ones_like(w).reshape(k * T, 1),
                          self.layer, self.provider, self.glu)
        return self.shared_expert(x) + routed.view(k, T, -1).sum(dim=0)


@register("Llama4ForCausalLM", "Llama4ForConditionalGeneration", family="llama4")
class Llama4(DecoderLM):
    def text_config(self) -> Mapping[str, Any]:
        tc = self.spec.raw.get("text_config")
        return tc if isinstance(tc, Mapping) else self.spec.raw

    def uses_rope(self, layer: int) -> bool:
        cfg, n = self.text_config(), self.spec.num_layers
        interval = int(cfg.get("no_rope_layer_interval") or 4)
        flags = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        return bool(flags[layer])

    def make_attention(self, layer: int) -> nn.Module:
        s, cfg = self.spec, self.text_config()
        use_rope = self.uses_rope(layer)
        chunk = cfg.get("attention_chunk_size") if s.layer_types[layer] == "chunked_attention" else None
        temperature = None
        if cfg.get("attn_temperature_tuning", True) and not use_rope:
            temperature = (float(cfg.get("floor_scale", 8192)), float(cfg.get("attn_scale", 0.1)))
        return Llama4Attention(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, bias=s.attention_bias, eps=s.rms_norm_eps,
            use_rope=use_rope, qk_l2_norm=use_rope and s.qk_norm != "none",
            chunk_size=int(chunk) if chunk else None, temperature=temperature,
        )

    def make_router(self, layer: int) -> nn.Module:
        s = self.spec
        return Llama4Router(s.hidden_size, s.num_experts, s.top_k)

    def make_mlp(self, layer: int) -> nn.Module:
        s = self.spec
        if not s.moe_layers[layer]:
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act)
        shared = GatedMLP(s.hidden_size, s.shared_expert_intermediate_size, s.hidden_act)
        return Llama4MoE(layer, self.make_router(layer), shared, act=s.hidden_act)

    def checkpoint_names(self, name: str) -> list[str]:
        name = name.replace(".mlp.gate.", ".mlp.router.").replace(".mlp.", ".feed_forward.")
        if name.startswith("lm_head."):
            return [name, f"language_model.{name}"]
        return [f"model.{name}", f"language_model.model.{name}"]

    def expert_prefixes(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.feed_forward.experts",
                f"language_model.model.layers.{layer}.feed_forward.experts"]

    def make_expert_reader(self, index: SafetensorsIndex, dtype: torch.dtype) -> ExpertReader:
        return TransposedFusedExpertReader(index, self.spec, dtype, self.expert_prefixes,
                                           interleaved=False, biases=False)
