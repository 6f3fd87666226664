"""Shared cumulative-attention threshold across layers (PrefixKV).

PrefixKV (Wang et al., 2024, arXiv 2412.03409; THU-MIG/PrefixKV `prefixkv.py`): per layer, sort
the token scores (mean over heads) in descending order, normalise them to sum 1 and take the
cumulative curve c_l(k) = importance mass of the top k tokens. One threshold p is shared by all
layers and each layer keeps the shortest prefix of its ranking that reaches it:

    keep_l(p) = (number of k with c_l(k) < p) + 1

Layers with concentrated attention need few tokens, diffuse ones many. The reference bisects p
until Σ_l keep_l(p) is within 5 tokens of the target; here p is chosen exactly among the curve
values (the only points where Σ keep changes) as the one whose Σ_l keep_l(p) is closest to
L · B (ties to the smaller p), and the keep_l(p) are then apportioned so the total is exact.
Every KV head of a layer gets the layer's budget. PrefixKV profiles p offline and ships one
fraction per layer; this computes it per prompt (the reference's `--profile` pass). The sink and
last tokens it protects count inside the curve, as they count inside the budget.

Scores are shifted to be non-negative when the scorer returns negative values (e.g. key_norm).

No parameters. Returns [n_layers, kv_heads] int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, layer_budgets
from kvsim.policies.parts import register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class PrefixMass(Allocator):
    name = "prefix_mass"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        curves = [mass_curve(layer_scores) for layer_scores in scores]
        thresholds = torch.cat(curves).unique()  # sorted ascending
        keeps = torch.stack([(torch.searchsorted(curve, thresholds) + 1).clamp(max=len(curve)) for curve in curves])  # [L, thresholds]
        gap = (keeps.sum(0) - len(views) * per_head).abs()
        best = int(torch.argmin(gap))  # the first minimum: the smallest such threshold
        return layer_budgets(keeps[:, best].double(), views, per_head)


def mass_curve(scores: torch.Tensor) -> torch.Tensor:
    """[n] float64: cumulative share of the layer's score mass held by its top-k tokens, k = 1..n."""
    mean = torch.nan_to_num(scores.double().mean(0), nan=0.0, neginf=0.0, posinf=0.0)
    if mean.min() < 0:
        mean = mean - mean.min()
    ranked = torch.sort(mean, descending=True).values
    if ranked.sum() <= 0:
        ranked = torch.ones_like(ranked)
    return torch.cumsum(ranked, 0) / ranked.sum()
