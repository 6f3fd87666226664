"""Layer budgets from how uniform each layer's attention is (D2O).

D2O (Wan et al., ICLR 2025, "Dynamic Discriminative Operations"; AIoT-MLSys-Lab/d2o
`modeling_llama3_new.py`): per layer, from the accumulated attention of every prompt query,

    s_h = Var_j colsum[h, j]                          per query head, over keys (unbiased)
    s̃_h = (s_h − min_h s) / (max_h s − min_h s + 1e−6)   min-max within the layer
    σ_l = mean_h s̃_h                                  in [0, 1]
    r_l = clamp(L · ρ · softmax_l(−σ), 0.01, 1)       fraction of the prompt kept at layer l

Lower σ (more uniform attention) gives a larger cache; since σ ∈ [0, 1] layers differ by at most
a factor e. Here L · ρ · n is the total L · B, so layer l's ideal is L · B · softmax_l(−σ); the
lower clamp becomes a floor f = ceil(0.01 · n) tokens (at most B) — layers under it are raised
to it and the others give back in proportion to what they hold above it — and the upper clamp is
the layer length, with overflow redistributed so the total stays exact (the reference instead
lets its total fall short). D2O never compresses layers 0, 1 and L − 1; that would break the
budget total, so it is not reproduced. Every KV head of a layer gets the layer's budget.

No parameters. Returns [n_layers, kv_heads] int64. Needs the views' column sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, layer_budgets
from kvsim.policies.parts import register
from kvsim.policies.scorers.accumulated_attention import accumulated
from kvsim.policies.view import CacheView

MIN_FRACTION = 0.01  # D2O's lower clamp on r_l


@register
@dataclass(frozen=True)
class VarianceSoftmax(Allocator):
    name = "variance_softmax"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        sigma = torch.stack([head_dispersion(view) for view in views])
        floor = min(max(1, math.ceil(MIN_FRACTION * min(v.length for v in views))), per_head)
        return layer_budgets(torch.softmax(-sigma, 0), views, per_head, floor=floor)


def head_dispersion(view: CacheView) -> torch.Tensor:
    """Scalar float64 σ_l: mean over query heads of the min-max normalised variance of colsum."""
    variance = accumulated(view, normalize=False).double().var(dim=-1)  # [heads]
    spread = variance.max() - variance.min()
    return ((variance - variance.min()) / (spread + 1e-6)).mean()
