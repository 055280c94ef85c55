"""Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, shared expert with a sigmoid shared_expert_gate."""

from __future__ import annotations

from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("Qwen2MoeForCausalLM", family="qwen2_moe")
class Qwen2Moe(DecoderLM):
    pass
