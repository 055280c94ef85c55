"""Llama (dense): the plain decoder; also the base for dense layers elsewhere."""

from __future__ import annotations

from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("LlamaForCausalLM", family="llama")
class Llama(DecoderLM):
    pass
