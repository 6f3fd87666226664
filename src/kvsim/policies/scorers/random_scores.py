"""Random scores: the baseline every informed policy must beat (kvpress RandomPress).

Each (layer, KV head, position) gets a uniform score in [0, 1) from a torch.Generator seeded with
`seed` and the layer, so runs are reproducible and a token keeps its score as the cache grows
(every-step schedules then evict a fixed random order, not a fresh draw each step).

Parameters: seed (0).
Returns [kv_heads, n] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import Scorer
from kvsim.policies.view import CacheView

# Seeds of different layers must not collide for any realistic layer count.
LAYER_STRIDE = 1_000_003


@register
@dataclass(frozen=True)
class RandomScores(Scorer):
    name = "random"
    seed: int = 0

    def validate(self) -> None:
        check(self.seed >= 0, self, f"seed must be >= 0, got {self.seed}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> RandomScores:
        return cls(seed=trial.suggest_int(f"{prefix}seed", 0, 1000))

    def score(self, view: CacheView) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * LAYER_STRIDE + view.layer)
        by_position = torch.rand(int(view.positions.max()) + 1, view.kv_heads, generator=generator)  # [positions, kv]
        return by_position[view.positions].T.contiguous()
