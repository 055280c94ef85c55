"""OLMoE: full-width q/k RMSNorm (over all heads, before the head split), optional clip_qkv."""

from __future__ import annotations

from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("OlmoeForCausalLM", family="olmoe")
class Olmoe(DecoderLM):
    pass
