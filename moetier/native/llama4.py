"""Single-token decode through the native kernels for Llama-4 (text), on ``csrc/sinks.c``'s
extended step (see :mod:`moetier.native.gpt_oss`): RoPE layers rotate adjacent pairs, L2-norm q
and k per head and attend within their ``attention_chunk_size`` chunk; NoPE layers attend to
everything with the query temperature ``1 + attn_scale log(1 + floor((pos + 1) / floor_scale))``;
the router takes the top-k logits and scores each with a sigmoid; each expert sees the
score-scaled input; the shared expert (and dense layers) run the SiLU gated MLP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moetier.layers.mlp import GatedMLP
from moetier.layers.norm import RMSNorm
from moetier.native.decode import DT, MAX_TOPK, _ptr, _silu_glu, _weight
from moetier.native.gpt_oss import ExtDecoder, OssDesc

if TYPE_CHECKING:
    from moetier.models.base import DecoderLM


def is_llama4(net: DecoderLM) -> bool:
    from moetier.models.llama4 import Llama4

    return isinstance(net, Llama4)


def _silu_mlp(m: Any) -> bool:
    return type(m) is GatedMLP and m.act is torch.nn.functional.silu and m.gate_proj.bias is None


def unsupported(net: DecoderLM) -> str | None:
    """Why the Llama-4 decoder ``net`` cannot decode natively (``None`` if it can)."""
    from moetier.models.base import DecoderLayer
    from moetier.models.llama4 import Llama4Attention, Llama4MoE, Llama4Router

    if net.dtype not in DT:
        return f"dtype {net.dtype}"
    if net.rotary.interleaved:
        return "interleaved rope tables"
    for i, layer in enumerate(net.layers):
        if type(layer) is not DecoderLayer:
            return f"layer {i} is a {type(layer).__name__}"
        a, mlp = layer.self_attn, layer.mlp
        if type(a) is not Llama4Attention or a.qk_norm != "none" or a.clip_qkv is not None or a.sliding_window:
            return f"layer {i}: attention is not Llama-4 attention"
        if a.head_dim > 1024:
            return f"layer {i}: head_dim {a.head_dim}"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return f"layer {i}: norms are not RMSNorm"
        if type(mlp) is Llama4MoE:
            if type(mlp.gate) is not Llama4Router or mlp.gate.top_k > MAX_TOPK:
                return f"layer {i}: router {type(mlp.gate).__name__}"
            if not _silu_glu(mlp) or not _silu_mlp(mlp.shared_expert):
                return f"layer {i}: expert activation is not SiLU-gated"
        elif not _silu_mlp(mlp):
            return f"layer {i}: feed-forward is a {type(mlp).__name__}"
    return None


class Llama4Decoder(ExtDecoder):
    """Llama-4: NoPE / chunked RoPE layers, L2 q/k norm, sigmoid router on the expert input, shared expert."""

    def describe_layer(self, i: int, layer: Any, d: OssDesc) -> None:
        a, mlp = layer.self_attn, layer.mlp
        d.rope = 2 if a.use_rope else 0
        d.qk_l2 = int(a.qk_l2_norm)
        d.chunk = int(a.chunk_size or 0)
        if a.temperature is not None:
            d.floor_scale, d.attn_scale = a.temperature
        d.act, d.route, d.scale_input = 1, 1, 1
        dense = mlp if type(mlp) is GatedMLP else mlp.shared_expert
        d.SI = _weight(dense.gate_proj).shape[0]
        d.s_gate, d.s_up, d.s_down = (self._w(_weight(p), f"layer {i} {n}") for p, n in (
            (dense.gate_proj, "gate_proj"), (dense.up_proj, "up_proj"), (dense.down_proj, "down_proj")))
        if type(mlp) is not GatedMLP:
            r = mlp.gate
            d.E, d.topk, d.I = r.weight.shape[0], r.top_k, self.net.spec.expert_intermediate_size
            d.router_w, d.router_b = self._w(r.weight, f"layer {i} router"), _ptr(getattr(r, "bias", None))
