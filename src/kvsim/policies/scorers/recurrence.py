"""Recurrence-aware score (LazyEviction, 2025) — **unverified: built from a third-party summary**.

LazyEviction observes that in long reasoning many tokens go quiet and are attended again later
("token importance recurrence"), so greedy per-step eviction loses them. The paper tracks, per
retained token, the last decode step its attention exceeded a threshold and the maximum
recurrence interval (MRI) between activations, and evicts only every W steps, dropping tokens past
their expected interval first. That tracking needs state carried from step to step, which a
`CacheView` does not hold (it has the last `window` queries and running column sums only), and
the paper's exact combination of the two recurrence terms could not be checked.

What is implemented instead: score = the *peak* attention a token received from any of the last
`window` queries (max over queries, not mean), so a token that was re-attended once recently
survives the next lagged eviction even if it was quiet for the rest of the window. Pair it with
`Lagged(every=W, recent=...)` for the lag.

Parameters: window (32), gqa ("max": a token any head of the group re-attends survives).
Returns [kv_heads, n] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import GQA_REDUCTIONS, Scorer
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class Recurrence(Scorer):
    name = "recurrence"
    per_head = True
    window: int = 32
    gqa: str = "max"

    def validate(self) -> None:
        check(self.window >= 1, self, f"window must be >= 1, got {self.window}")
        check(self.gqa in GQA_REDUCTIONS, self, f"gqa must be one of {', '.join(GQA_REDUCTIONS)}, got {self.gqa!r}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Recurrence:
        return cls(
            window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]),
            gqa=trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS)),
        )

    def score(self, view: CacheView) -> torch.Tensor:
        peak = view.window(self.window).amax(1)  # [heads, n]
        return reduce_group(peak, view.kv_heads, self.gqa)
