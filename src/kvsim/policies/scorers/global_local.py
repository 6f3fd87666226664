"""Global-local importance (EMS, "Evict-then-Merge", 2024) — **paper-only, formula unverified**.

EMS combines accumulated attention from every prompt query (global; biased toward early tokens by
the causal mask) with attention from a recent window (local; biased toward recent tokens by RoPE
decay) so that neither bias dominates. No public code was found, and the paper's exact
normalisation could not be checked, so this is kvsim's own formula:

    global_h[j] = colsum_h[j] / (queries that saw j)        mean attention received (de-biased)
    local_h[j]  = mean_{i in last `window` queries} A[h, i, j]
    score_h[j]  = (1 − local_weight) · global_h[j] / Σ_j global_h[j]
                +      local_weight  · local_h[j]  / Σ_j local_h[j]

Both terms are normalised to sum to 1 over the keys of a head, so `local_weight` is the share of
influence given to the local view; then the query heads of each GQA group are reduced.

Parameters: local_weight (0.5, in [0, 1]), window (32), gqa ("mean" or "max").
Returns [kv_heads, n] float32. Needs the view's column sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.accumulated_attention import accumulated
from kvsim.policies.scorers.base import GQA_REDUCTIONS, Scorer
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class GlobalLocal(Scorer):
    name = "global_local"
    per_head = True
    local_weight: float = 0.5
    window: int = 32
    gqa: str = "mean"

    def validate(self) -> None:
        check(0.0 <= self.local_weight <= 1.0, self, f"local_weight must be in [0, 1], got {self.local_weight}")
        check(self.window >= 1, self, f"window must be >= 1, got {self.window}")
        check(self.gqa in GQA_REDUCTIONS, self, f"gqa must be one of {', '.join(GQA_REDUCTIONS)}, got {self.gqa!r}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> GlobalLocal:
        return cls(
            local_weight=trial.suggest_float(f"{prefix}local_weight", 0.0, 1.0),
            window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]),
            gqa=trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS)),
        )

    def score(self, view: CacheView) -> torch.Tensor:
        global_ = accumulated(view, normalize=True)  # [heads, n]
        local = view.window(self.window).mean(1)  # [heads, n]
        combined = (1 - self.local_weight) * unit_sum(global_) + self.local_weight * unit_sum(local)
        return reduce_group(combined, view.kv_heads, self.gqa)


def unit_sum(x: torch.Tensor) -> torch.Tensor:
    """Scale each row to sum to 1 (rows of zeros stay zero)."""
    return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
