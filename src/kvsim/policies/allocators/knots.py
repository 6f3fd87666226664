"""A low-dimensional depth profile of budgets, with optional head competition (kvsim's own).

Per-layer budgets are a smooth function of depth given by a few knots: K positive values placed
evenly over the layers (knot k at depth k / (K − 1)), linearly interpolated, so layer l of L gets

    P_l = interp(l / (L − 1); knots)

and keeps its protected tokens w (the schedule's sinks + recent window) plus P_l / Σ P · L · (B − w)
of the rest (`reserve_then_share`, CAKE's split with the profile as the preference). Searching
K ≈ 4 numbers instead of one weight per layer (`free_vector`) is what lets a sampler learn a
depth profile in a couple of hundred trials: PyramidKV's decreasing line, a U, a bump in the
middle are all a few knots (the search-over-shapes idea of PyramidKV, arXiv 2406.02069, and
SqueezeAttention, arXiv 2404.04793, which find that budgets should vary with depth).

Inside each layer the KV heads then compete by score with strength `head_strength` (Ada-KV,
arXiv 2407.11550, `head_adaptive.head_shares` with alpha = 1 − head_strength): 0 gives every head
the layer's budget, 1 splits it by the global top-k of the layer's scores.

Parameters:
    knots ((1.0, 1.0, 1.0)): relative budgets at evenly spaced depths, at least one, all positive
        (one knot is a flat profile, two a linear ramp).
    head_strength (0.0): in [0, 1], how much the KV heads of a layer compete for its budget.

Search: `suggest` samples 4 knots log-uniformly in [0.1, 10] and the head strength in [0, 1].
Returns [n_layers, kv_heads] int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, reserve_then_share
from kvsim.policies.allocators.head_adaptive import head_shares
from kvsim.policies.parts import check, register
from kvsim.policies.view import CacheView

SUGGESTED_KNOTS = 4


@register
@dataclass(frozen=True)
class Knots(Allocator):
    name = "knots"
    knots: tuple[float, ...] = (1.0, 1.0, 1.0)
    head_strength: float = 0.0

    def validate(self) -> None:
        check(len(self.knots) > 0, self, "knots must be a non-empty list of positive numbers")
        check(all(math.isfinite(k) and k > 0 for k in self.knots), self, f"knots must all be positive finite numbers, got {list(self.knots)}")
        check(0.0 <= self.head_strength <= 1.0, self, f"head_strength must be in [0, 1], got {self.head_strength}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Knots:
        return cls(
            knots=tuple(trial.suggest_float(f"{prefix}knot{k}", 0.1, 10.0, log=True) for k in range(SUGGESTED_KNOTS)),
            head_strength=trial.suggest_float(f"{prefix}head_strength", 0.0, 1.0),
        )

    def trial_params(self, prefix: str) -> dict:
        return {**{f"{prefix}knot{k}": knot for k, knot in enumerate(self.knots)}, f"{prefix}head_strength": self.head_strength}

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        layers = reserve_then_share(self.profile(len(views)), views, per_head, protected.reserved(per_head))
        if self.head_strength == 0:
            return layers
        return torch.stack(
            [
                head_shares(view, layer_scores, int(layer[0]), protected, 1.0 - self.head_strength)
                for view, layer_scores, layer in zip(views, scores, layers)
            ]
        )

    def profile(self, n_layers: int) -> torch.Tensor:
        """[n_layers] float64: the knots linearly interpolated at each layer's depth."""
        knots = torch.tensor(self.knots, dtype=torch.float64)
        if len(knots) == 1:
            return knots.expand(n_layers).clone()
        at = torch.linspace(0, len(knots) - 1, n_layers, dtype=torch.float64)  # each layer's place among the knots
        low = at.floor().long().clamp(max=len(knots) - 2)
        return knots[low] + (at - low) * (knots[low + 1] - knots[low])
