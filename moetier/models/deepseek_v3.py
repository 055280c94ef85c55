"""DeepSeek-V3 / Kimi-K2: the DeepSeek-V2 decoder with V3 routing.

V3 routes with sigmoid scores, an ``e_score_correction_bias`` used only to *choose* experts
(``noaux_tc``: groups ranked by the sum of their two best biased scores), renormalised top-k
weights always multiplied by ``routed_scaling_factor``. ``rope_interleave`` (default true)
selects the pair layout of the rotary dims. Multi-token-prediction layers stored after
``num_hidden_layers`` are not loaded.
"""

from __future__ import annotations

from moetier.models.deepseek_v2 import DeepseekV2
from moetier.models.registry import register


@register("DeepseekV3ForCausalLM", family="deepseek_v3")
class DeepseekV3(DeepseekV2):
    scale_after_norm = True

    def interleaved_rope(self) -> bool:
        return bool(self.spec.raw.get("rope_interleave", True))
