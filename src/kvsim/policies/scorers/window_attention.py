"""Observation-window attention (SnapKV; also PyramidKV's and Ada-KV's scorer).

SnapKV (Li et al., 2024, arXiv 2404.14469): the last `window` prompt queries "vote" for the prefix
tokens they attend to. Score = mean attention over the window's queries (the reference sums; the
ranking within a head is the same), smoothed by 1-D pooling, then reduced over the query heads of
each GQA group so the cache is kept per KV head (kvpress and Ada-KV's `gqa_support`; the original
repository selected per query head, holding G times the memory).

Parameters: window (32; reference LongBench configs), pool ("max"), kernel (7), gqa ("mean").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import Scorer, check_pooling, pool_scores, suggest_pooling, unpooled
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class WindowAttention(Scorer):
    name = "window_attention"
    window: int = 32
    pool: str = "max"
    kernel: int = 7
    gqa: str = "mean"

    def validate(self) -> None:
        check(self.window >= 1, self, f"window must be >= 1, got {self.window}")
        check_pooling(self, self.pool, self.kernel, self.gqa)

    @classmethod
    def suggest(cls, trial, prefix: str) -> WindowAttention:
        return cls(window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]), **suggest_pooling(trial, prefix))

    @property
    def per_head(self) -> bool:
        return unpooled(self.pool, self.kernel)

    def score(self, view: CacheView) -> torch.Tensor:
        per_query_head = view.window(self.window).mean(dim=1)
        return reduce_group(pool_scores(per_query_head, self.pool, self.kernel), view.kv_heads, self.gqa)
