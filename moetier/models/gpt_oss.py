"""gpt-oss: attention sinks, alternating sliding / full attention, clamped SwiGLU experts.

* Attention: GQA with q/k/v/o biases and one learned *sink* logit per head that joins every
  softmax (``softmax([scores, sink])`` then the sink column is dropped), so a head can attend
  "nowhere". ``layer_types`` alternates ``sliding_attention`` (window ``sliding_window``) and
  ``full_attention``. RoPE is YaRN with ``truncate: false``, rotate-half layout.
* Router: ``mlp.router`` (weight + bias); top-k of the logits, softmax over those k.
* Experts: fused ``mlp.experts.gate_up_proj [E, H, 2I]`` (gate/up interleaved) with biases,
  split per expert by :class:`~moetier.models._fused_experts.TransposedFusedExpertReader`;
  activation ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=l)``,
  ``l = swiglu_limit`` (7.0), ``alpha = swiglu_alpha`` (1.702).

Both the MXFP4 release (experts as ``*_blocks`` / ``*_scales``, kept in MXFP4: see
``moetier.quant.mxfp4``) and unquantised checkpoints (bf16 / fp32) run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetier.layers.attention import Attention, Sequence, cache_append, causal_mask
from moetier.layers.moe import GluFn, MoEBlock
from moetier.models._fused_experts import TransposedFusedExpertReader
from moetier.models.base import DecoderLM, ExpertReader
from moetier.models.registry import register
from moetier.weights.safetensors_io import SafetensorsIndex


class SinkAttention(Attention):
    """GQA attention whose softmax has one extra learned logit per head (``sinks`` [heads])."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sinks = nn.Parameter(torch.empty(self.n_heads))

    def _attend(self, seq: Sequence, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [n, H, D], k/v [n, KV, D] for one sequence -> [n, H, D]."""
        n = q.shape[0]
        K, V = cache_append(seq, layer, (k.transpose(0, 1), v.transpose(0, 1)))  # [KV, L, D]
        rep = self.n_heads // self.n_kv
        K, V = K.repeat_interleave(rep, dim=0), V.repeat_interleave(rep, dim=0)  # [H, L, D]
        scores = (q.transpose(0, 1) @ K.transpose(1, 2)) * self.scale  # [H, n, L]
        mask = causal_mask(seq.length, n, K.shape[1], self.sliding_window)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sink = self.sinks.to(scores.dtype).view(-1, 1, 1).expand(-1, n, 1)  # [H, n, 1]
        p = torch.cat([scores, sink], dim=-1).float().softmax(dim=-1)[..., :-1]  # drop the sink
        return (p.to(V.dtype) @ V).transpose(0, 1)  # [n, H, D]


class GptOssRouter(nn.Module):
    """``weight`` [E, H] + ``bias`` [E]: top-k of the logits, softmax over the chosen k."""

    def __init__(self, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.bias = nn.Parameter(torch.empty(n_experts))
        self.top_k = top_k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(x, self.weight, self.bias)  # [T, E]
        top, ids = logits.topk(self.top_k, dim=-1)  # [T, k]
        return ids, top.float().softmax(dim=-1).to(x.dtype)


def clamped_swiglu(limit: float, alpha: float) -> GluFn:
    """gpt-oss expert activation on (gate, up) [n, I]."""

    def glu(g: Tensor, u: Tensor) -> Tensor:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))

    return glu


@register("GptOssForCausalLM", family="gpt_oss")
class GptOss(DecoderLM):
    def make_attention(self, layer: int) -> nn.Module:
        s = self.spec
        window = s.sliding_window if s.layer_types[layer] == "sliding_attention" else None
        return SinkAttention(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
            qkv_bias=s.attention_bias, o_bias=s.o_proj_bias, eps=s.rms_norm_eps, sliding_window=window,
        )

    def make_router(self, layer: int) -> nn.Module:
        s = self.spec
        return GptOssRouter(s.hidden_size, s.num_experts, s.top_k)

    def make_mlp(self, layer: int) -> nn.Module:
        s = self.spec
        limit = s.swiglu_limit if s.swiglu_limit is not None else 7.0
        alpha = float(s.raw.get("swiglu_alpha", 1.702))
        return MoEBlock(layer, self.make_router(layer), glu=clamped_swiglu(limit, alpha))

    def checkpoint_names(self, name: str) -> list[str]:
        return [n.replace(".mlp.gate.", ".mlp.router.") for n in super().checkpoint_names(name)]

    def expert_prefixes(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.mlp.experts"]

    def make_expert_reader(self, index: SafetensorsIndex, dtype: torch.dtype) -> ExpertReader:
        return TransposedFusedExpertReader(index, self.spec, dtype, self.expert_prefixes,
                                           interleaved=True, biases=True)
