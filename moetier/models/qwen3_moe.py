"""Qwen3-MoE: per-head q/k RMSNorm, softmax top-k routing (norm_topk_prob), dense layers via
``mlp_only_layers`` / ``decoder_sparse_step``. All handled by the generic decoder flags."""

from __future__ import annotations

from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("Qwen3MoeForCausalLM", family="qwen3_moe")
class Qwen3Moe(DecoderLM):
    pass
