"""DeepSeek-V2 (and the shared DeepSeek MLA + grouped-router decoder used by V3).

Differences from the generic decoder:

* attention is MLA (``layers.mla``): latent KV cache, q through ``q_proj`` or the
  ``q_a_proj -> q_a_layernorm -> q_b_proj`` bottleneck, rope on ``qk_rope_head_dim`` dims,
  interleaved-pair rope layout, YaRN ``mscale_all_dim`` folded into the softmax scale;
* the first ``first_k_dense_replace`` layers (and layers off ``moe_layer_freq``) are dense;
* routing is ``layers.routing.GroupedTopKRouter`` (greedy / group_limited_greedy, softmax);
* ``n_shared_experts`` always-on experts (one FFN ``n_shared * moe_intermediate_size`` wide,
  stored as ``mlp.shared_experts``).

DeepSeek-V2 semantics of ``norm_topk_prob``: renormalised weights are *not* multiplied by
``routed_scaling_factor`` (the reference code scales only when it does not renormalise); all
released V2 checkpoints have ``norm_topk_prob: false``.
"""

from __future__ import annotations

from torch import nn

from moetier.layers.mla import MLAAttention, MLAShape, mla_softmax_scale
from moetier.layers.mlp import GatedMLP
from moetier.layers.moe import MoEBlock
from moetier.layers.rope import Rotary, rope_frequencies
from moetier.layers.routing import GroupedTopKRouter
from moetier.models.base import DecoderLM
from moetier.models.registry import register


@register("DeepseekV2ForCausalLM", family="deepseek_v2")
class DeepseekV2(DecoderLM):
    # V3 always multiplies by routed_scaling_factor; V2 only when it does not renormalise
    scale_after_norm: bool = False

    def interleaved_rope(self) -> bool:
        return True  # DeepSeek-V2 rotates adjacent pairs (complex multiplication)

    def make_rotary(self) -> Rotary:
        s = self.spec
        inv, factor = rope_frequencies(s.qk_rope_head_dim, s.rope_theta, s.rope_scaling, s.max_position_embeddings)
        return Rotary(inv, factor)

    def make_attention(self, layer: int) -> nn.Module:
        s = self.spec
        shape = MLAShape(
            num_heads=s.num_heads, kv_lora_rank=s.kv_lora_rank, qk_nope_head_dim=s.qk_nope_head_dim,
            qk_rope_head_dim=s.qk_rope_head_dim, v_head_dim=s.v_head_dim,
            eps=1e-6,  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps
            interleaved_rope=self.interleaved_rope(),
            softmax_scale=mla_softmax_scale(s.qk_nope_head_dim + s.qk_rope_head_dim, s.rope_scaling),
        )
        return MLAAttention(s.hidden_size, shape, s.q_lora_rank, bias=s.attention_bias)

    def make_router(self, layer: int) -> nn.Module:
        return GroupedTopKRouter(self.spec, scale_after_norm=self.scale_after_norm)

    def make_mlp(self, layer: int) -> nn.Module:
        s = self.spec
        if not s.moe_layers[layer]:
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act)
        shared = None
        if s.shared_expert_intermediate_size:
            shared = GatedMLP(s.hidden_size, s.shared_expert_intermediate_size, s.hidden_act)
        return MoEBlock(layer, self.make_router(layer), shared, act=s.hidden_act)

    def checkpoint_names(self, name: str) -> list[str]:
        # MoEBlock.shared_expert is DeepSeek's mlp.shared_experts (plural)
        return [n.replace(".mlp.shared_expert.", ".mlp.shared_experts.") for n in super().checkpoint_names(name)]
