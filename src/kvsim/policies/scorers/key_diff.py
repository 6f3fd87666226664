"""KeyDiff (Park et al., 2025, arXiv 2504.15364; kvpress KeyDiffPress): keep the distinctive keys.

Per KV head, the anchor is the mean of the unit-normalised keys; a token's score is minus the
cosine similarity of its key to the anchor, so keys unlike the average one are kept. Needs no
attention, so it works unchanged in query-agnostic mode. (The paper evicts block by block while the
prompt streams in; kvpress and kvsim score the whole prefix at once.)

Parameters: pool ("none"), kernel (1): optional smoothing or ChunkKV chunks (`pool_scores`).
Returns [kv_heads, n] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsim.policies.parts import register
from kvsim.policies.scorers.base import Scorer, check_pool, pool_scores, suggest_pool, unpooled
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class KeyDiff(Scorer):
    name = "key_diff"
    pool: str = "none"
    kernel: int = 1

    def validate(self) -> None:
        check_pool(self, self.pool, self.kernel)

    @classmethod
    def suggest(cls, trial, prefix: str) -> KeyDiff:
        return cls(**suggest_pool(trial, prefix))

    @property
    def per_head(self) -> bool:
        return unpooled(self.pool, self.kernel)

    def score(self, view: CacheView) -> torch.Tensor:
        unit = F.normalize(view.keys.float(), dim=-1)
        held = torch.ones(unit.shape[:2]) if view.present is None else view.present.float()
        anchor = (unit * held[..., None]).sum(1, keepdim=True) / held.sum(1).clamp(min=1)[:, None, None]
        scores = -F.cosine_similarity(view.keys.float(), anchor, dim=-1)
        return pool_scores(scores, self.pool, self.kernel)
