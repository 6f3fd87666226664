"""Head-adaptive budgets: heads compete for a layer's budget by score (Ada-KV).

Ada-KV (Feng et al., 2024, arXiv 2407.11550; FFY0/AdaKV `AdaptiveSnapKVCluster.update_kv_gqa`):
every layer keeps the uniform total kv_heads · B, but inside the layer the KV heads' scores are
flattened and the global top kv_heads · b taken (b = B − w, w = the schedule's protected tokens,
sinks + recent window); head h's share c_h is how many of those came from it. A safeguard keeps
every head a floor:

    B_h = (1 − alpha) · c_h + alpha · b + w

(the reference floors alpha · b and rounds; here the B_h, which already sum to the layer total,
are apportioned exactly). Protected tokens are kept out of the competition and given to every
head (the reference's observation window, which the Ada-KV preset protects as its recent window).
The ranking is on raw score magnitudes across heads, so a head with many high scores takes budget
from a head whose scores are all low; Ada-KV's optional per-head normalisation is not implemented.

Parameters:
    alpha (0.2; the reference GQA scripts' `floor_alpha`): share of each head's budget that is
        uniform, in [0, 1]. 1 is uniform allocation, 0 pure global top-k.

Returns [n_layers, kv_heads] int64; each layer sums to kv_heads · B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import MOVED_TO_SCHEDULE, Allocator, Protected, proportional
from kvsim.policies.parts import check, register
from kvsim.policies.selection import protected_priority
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class HeadAdaptive(Allocator):
    name = "head_adaptive"
    alpha: float = 0.2
    retired = {"recent": MOVED_TO_SCHEDULE}

    def validate(self) -> None:
        check(0.0 <= self.alpha <= 1.0, self, f"alpha must be in [0, 1], got {self.alpha}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> HeadAdaptive:
        return cls(alpha=trial.suggest_float(f"{prefix}alpha", 0.0, 1.0))

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        return torch.stack([head_shares(view, layer_scores, per_head, protected, self.alpha) for view, layer_scores in zip(views, scores)])


def head_shares(view: CacheView, scores: torch.Tensor, per_head: int, protected: Protected, alpha: float) -> torch.Tensor:
    """[kv_heads] int64 budgets summing exactly to kv_heads · per_head: Ada-KV's split of one layer's
    total between its KV heads by the global top-k of `scores` [kv_heads, n] outside the protected
    tokens, with a uniform floor of share `alpha`."""
    kv_heads = scores.shape[0]
    reserved = min(protected.reserved(per_head), view.length)
    base = per_head - reserved
    candidates = scores[:, protected_priority(view.positions, protected.sinks, protected.recent) == 0].double()
    order = torch.sort(candidates.flatten(), descending=True, stable=True).indices[: kv_heads * base]
    counts = torch.bincount(order // max(candidates.shape[1], 1), minlength=kv_heads).double()
    weights = (1 - alpha) * counts + alpha * base + reserved
    caps = torch.full((kv_heads,), view.length, dtype=torch.int64)
    return proportional(weights, kv_heads * per_head, caps)
