"""DeepSeek-style expert choice: grouped top-k, sigmoid scoring, correction bias, scaling.

The plain softmax top-k router lives in ``layers.moe`` (:class:`SoftmaxTopKRouter`); this is
the general one DeepSeek-V2 / V3 / Kimi-K2 need, driven by ModelSpec's routing fields.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetier.errors import ConfigError
from moetier.spec import ModelSpec


def grouped_topk(
    logits: Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    topk_method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias: Tensor | None = None,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    scale_after_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-style expert choice; returns (topk_ids [T, k] int64, topk_weights [T, k] float32).

    logits: [T, E] router logits (computed in float32).
    * scores = softmax(logits) or sigmoid(logits);
    * ``greedy``: top-k of the scores;
    * ``group_limited_greedy`` (DeepSeek-V2): keep the ``topk_group`` expert groups whose best
      score is highest, top-k inside them;
    * ``noaux_tc`` (DeepSeek-V3): choose on ``scores + correction_bias``; groups ranked by the
      sum of their two best biased scores; the weights are the *unbiased* scores.
    * ``norm_topk_prob`` renormalises the k weights to sum to one (k > 1);
      ``routed_scaling_factor`` multiplies them. DeepSeek-V2 scales only when it does not
      renormalise (``scale_after_norm=False``); V3 always scales.
    """
    T, E = logits.shape
    logits = logits.float()
    if scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ConfigError(f"config.json: field 'scoring_func' must be softmax or sigmoid, got {scoring_func!r}")
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]

    if n_group > 1 and E % n_group:
        raise ConfigError(f"config.json: field 'n_group' ({n_group}) must divide the expert count ({E})")
    if topk_method in ("group_limited_greedy", "noaux_tc") and n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
            fill = float("-inf")
        else:
            group_scores = grouped.max(dim=-1).values  # [T, G]
            fill = 0.0
        keep = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, fill)

    topk_ids = choice.topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, topk_ids)  # [T, k]
    if topk_method == "group_limited_greedy" and n_group > 1:
        weights = weights * expert_mask.gather(1, topk_ids)  # like V2: masked experts weigh 0
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if scale_after_norm:
            weights = weights * routed_scaling_factor
    else:
        weights = weights * routed_scaling_factor
    return topk_ids, weights


class GroupedTopKRouter(nn.Module):
    """DeepSeek ``MoEGate``: ``weight`` [E, H] (+ ``e_score_correction_bias`` [E] for noaux_tc).

    Logits are computed in float32 like the reference; weights are returned in x's dtype.
    """

    def __init__(self, spec: ModelSpec, scale_after_norm: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(spec.num_experts)) if spec.score_correction_bias else None
        )
        self.top_k = spec.top_k
        self.scoring_func, self.topk_method = spec.scoring_func, spec.topk_method
        self.n_group, self.topk_group = spec.n_group, spec.topk_group
        self.norm_topk_prob, self.scaling = spec.norm_topk_prob, spec.routed_scaling_factor
        self.scale_after_norm = scale_after_norm

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> topk_ids [T, k] int64, topk_weights [T, k]."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        ids, w = grouped_topk(
            logits, self.top_k, scoring_func=self.scoring_func, topk_method=self.topk_method,
            n_group=self.n_group, topk_group=self.topk_group,
            correction_bias=self.e_score_correction_bias, norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.scaling, scale_after_norm=self.scale_after_norm,
        )
        return ids, w.to(x.dtype)
