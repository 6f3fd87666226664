"""Head-adaptive budgets: heads compete for a layer's budget by score (Ada-KV).

Ada-KV (Feng et al., 2024, arXiv 2407.11550; FFY0/AdaKV `AdaptiveSnapKVCluster.update_kv_gqa`):
every layer keeps the uniform total kv_heads · B, but inside the layer the KV heads' scores are
flattened and the global top kv_heads · b taken (b = B − recent); head h's share c_h is how many
of those came from it. A safeguard keeps every head a floor:

    B_h = (1 − alpha) · c_h + alpha · b + recent

(the reference floors alpha · b and rounds; here the B_h, which already sum to the layer total,
are apportioned exactly). The ranking is on raw score magnitudes across heads, so a head with
many high scores takes budget from a head whose scores are all low; Ada-KV's optional
per-head normalisation is not implemented.

Parameters:
    alpha (0.2; the reference GQA scripts' `floor_alpha`): share of each head's budget that is
        uniform, in [0, 1]. 1 is uniform allocation, 0 pure global top-k.
    recent (0): tokens of each budget reserved for the recent window (the last `recent` cached
        tokens), excluded from the competition and given to every head; set it to the schedule's
        `recent` (32 in the Ada-KV preset).

Returns [n_layers, kv_heads] int64; each layer sums to kv_heads · B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, proportional
from kvsim.policies.parts import check, register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class HeadAdaptive(Allocator):
    name = "head_adaptive"
    alpha: float = 0.2
    recent: int = 0

    def validate(self) -> None:
        check(0.0 <= self.alpha <= 1.0, self, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.recent >= 0, self, f"recent must be >= 0, got {self.recent}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> HeadAdaptive:
        return cls(
            alpha=trial.suggest_float(f"{prefix}alpha", 0.0, 1.0),
            recent=trial.suggest_categorical(f"{prefix}recent", [0, 8, 16, 32, 64]),
        )

    def allocate(self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int) -> torch.Tensor:
        return torch.stack([self._layer(view, layer_scores, per_head) for view, layer_scores in zip(views, scores)])

    def _layer(self, view: CacheView, scores: torch.Tensor, per_head: int) -> torch.Tensor:
        kv_heads, length = scores.shape
        recent = min(self.recent, per_head, length)
        base = per_head - recent
        candidates = scores[:, : length - recent].double()
        order = torch.sort(candidates.flatten(), descending=True, stable=True).indices[: kv_heads * base]
        counts = torch.bincount(order // candidates.shape[1], minlength=kv_heads).double()
        weights = (1 - self.alpha) * counts + self.alpha * base + recent
        caps = torch.full((kv_heads,), view.length, dtype=torch.int64)
        return proportional(weights, kv_heads * per_head, caps)
