"""Mixtral: experts under ``block_sparse_moe`` named w1 (gate) / w3 (up) / w2 (down)."""

from __future__ import annotations

from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("MixtralForCausalLM", family="mixtral")
class Mixtral(DecoderLM):
    def checkpoint_names(self, name: str) -> list[str]:
        # our `layers.N.mlp.gate.weight` is the router, stored as block_sparse_moe.gate
        names = super().checkpoint_names(name)
        if ".mlp." in name:
            names = [n.replace(".mlp.", ".block_sparse_moe.") for n in names] + names
        return names

    def expert_prefixes(self, layer: int) -> list[str]:
        return [f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"]

    def make_attention(self, layer: int):
        attn = super().make_attention(layer)
        attn.sliding_window = self.spec.sliding_window  # mixtral applies its window on every layer
        return attn
