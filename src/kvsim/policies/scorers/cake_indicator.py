"""CAKE's eviction indicator: mean plus variance of window attention.

CAKE (Qin et al., ICLR 2025, "Cascading and Adaptive KV cache Eviction with Layer Preferences";
antgroup/cakekv `cake/model/modify_llama.py`): for every prefix key,

    I_h[j] = mean_i A[h, i, j] + gamma · Var_i A[h, i, j]       (i over the last `window` queries)

with the unbiased variance (torch.var's default), so a token whose attention is shifting across
the window is kept even when its average is modest. Then, as in the reference: keep only the
prefix columns (keys before the window's first query), average-pool them along positions
(kernel 5, zero padding counted, so the ends of the prefix are diluted), and average over the
query heads of each GQA group.

The window's own keys are not pooled (the reference drops them and always keeps them); here they
get their raw indicator and the CAKE preset protects them with `PrefillOnce(recent=window)`.
The reference casts probabilities to fp16/bf16 before the variance, which flushes most small
variances to zero on long prompts; this runs in float32, so low-scoring tokens may order slightly
differently.

While decoding (every-step schedule, as the reference's `cake` runs), the indicator is the newest
query's attention alone, pooled and group-averaged the same way, with the window's keys protected.

Parameters: window (32), gamma (200.0), kernel (5, odd; avg pooling).
Returns [kv_heads, n] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import Scorer, pool_scores
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class CakeIndicator(Scorer):
    name = "cake_indicator"
    window: int = 32
    gamma: float = 200.0
    kernel: int = 5

    def validate(self) -> None:
        check(self.window >= 2, self, f"window must be >= 2 (the variance needs two queries), got {self.window}")
        check(self.gamma >= 0, self, f"gamma must be >= 0, got {self.gamma}")
        check(self.kernel >= 1 and self.kernel % 2 == 1, self, f"kernel must be an odd number >= 1, got {self.kernel}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> CakeIndicator:
        return cls(
            window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]),
            gamma=trial.suggest_float(f"{prefix}gamma", 1.0, 1000.0, log=True),
            kernel=trial.suggest_categorical(f"{prefix}kernel", [1, 3, 5, 7]),
        )

    def score(self, view: CacheView) -> torch.Tensor:
        if view.decoding:
            # While decoding the reference (`CakeDecodingKVCache_LayerWise`) scores by the newest
            # query's attention alone: one row, so no variance term.
            indicator = view.window(1)[:, 0]
        else:
            attention = view.window(self.window)  # [heads, window, n]
            indicator = attention.mean(1) + self.gamma * attention.var(1)  # unbiased, as torch.var
        prefix = prefix_length(view, self.window)
        if prefix > 0:
            indicator = torch.cat([pool_scores(indicator[:, :prefix], "avg", self.kernel), indicator[:, prefix:]], dim=-1)
        return reduce_group(indicator, view.kv_heads, "mean")


def prefix_length(view: CacheView, window: int) -> int:
    """How many cached keys come before the first of the last `window` queries (the eviction candidates)."""
    first_query = view.query_positions[-window]
    return int((view.positions < first_query).sum())
