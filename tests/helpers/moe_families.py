"""Tiny-checkpoint recipes for deepseek_v2, deepseek_v3, gpt_oss and llama4.

Importing this module registers them with :func:`tests.helpers.make_tiny_checkpoint`.
On top of the generic randomisation (std 1/sqrt(fan_in), decisive routers), the init hooks
make the family-specific paths non-degenerate: DeepSeek-V3's ``e_score_correction_bias`` (a
zero buffer in transformers), gpt-oss's router (stored as ``mlp.router``, so the generic
router rule misses it), its attention sinks and expert biases (zero-initialised), and the
fused expert tensors (generic std uses the wrong fan-in for ``[E, H, 2I]``).
"""

from __future__ import annotations

import torch

from tests.helpers.checkpoints import register_family

NAMES = ("deepseek_v2", "deepseek_v3", "gpt_oss", "llama4")

_MLA = dict(
    num_key_value_heads=4,  # MLA has no KV groups; transformers' eager path wants kv heads == heads
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _deepseek_init(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # sigmoid scores live in (0, 1): a bias of this size changes which experts win
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def _gpt_oss_init(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(4.0 / p.shape[-1] ** 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("router.bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))  # comparable to the attention logits
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                # [E, in, out] (x @ W): fan-in is dim 1; scale gate/up so the swiglu clamp is hit
                gain = 4.0 if name.endswith("gate_up_proj") else 1.0
                p.copy_(gain / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("_proj_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _llama4_init(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(4.0 / p.shape[-1] ** 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.copy_(1.0 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=gen))


register_family("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
                {**_MLA, "topk_method": "greedy", "norm_topk_prob": False}, _deepseek_init)
register_family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                {**_MLA, "q_lora_rank": 24, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                 "norm_topk_prob": True}, _deepseek_init)
register_family(
    "gpt_oss", "GptOssConfig", "GptOssForCausalLM",
    dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=8,
         rms_norm_eps=1e-5),
    _gpt_oss_init,
)
register_family(
    "llama4", "Llama4TextConfig", "Llama4ForCausalLM",
    dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=96,
         head_dim=16, num_hidden_layers=4, interleave_moe_layer_step=1, attention_chunk_size=8,
         no_rope_layer_interval=2, floor_scale=4, attn_scale=0.1, rms_norm_eps=1e-5),
    _llama4_init,
)
