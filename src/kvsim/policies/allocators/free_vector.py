"""A free per-layer budget vector, for search to set (kvsim's own allocator).

Layer l keeps weights[l] / Σ weights of the cache's total, the same for every KV head of the
layer, apportioned exactly (caps at the layer length are redistributed). The vector is sized for
one model: `n_layers` is its length, and `Policy.check_model` rejects a model with a different
layer count.

Parameters:
    weights (no default; required): positive relative budgets, one per layer.

Search: `suggest` cannot know the layer count; use `FreeVector.suggest_for(trial, prefix,
n_layers)`, which samples each weight log-uniformly in [0.1, 10].

Returns [n_layers, kv_heads] int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError
from kvsim.policies.allocators.base import Allocator, Protected, layer_budgets
from kvsim.policies.parts import check, register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class FreeVector(Allocator):
    name = "free_vector"
    weights: tuple[float, ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    def validate(self) -> None:
        check(len(self.weights) > 0, self, "weights must be a non-empty list with one positive number per layer")
        check(
            all(math.isfinite(w) and w > 0 for w in self.weights),
            self,
            f"weights must all be positive finite numbers, got {list(self.weights)}",
        )

    @classmethod
    def suggest(cls, trial, prefix: str) -> FreeVector:
        raise KvsimError(
            "allocator 'free_vector' needs the model's layer count to be searched: "
            "call FreeVector.suggest_for(trial, prefix, n_layers)"
        )

    @classmethod
    def suggest_for(cls, trial, prefix: str, n_layers: int) -> FreeVector:
        return cls(weights=tuple(trial.suggest_float(f"{prefix}layer{layer}", 0.1, 10.0, log=True) for layer in range(n_layers)))

    def trial_params(self, prefix: str) -> dict:
        return {f"{prefix}layer{layer}": weight for layer, weight in enumerate(self.weights)}

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        if len(views) != self.n_layers:
            raise KvsimError(
                f"allocator 'free_vector' has {self.n_layers} weights but the cache has {len(views)} layers: "
                f"give one weight per layer"
            )
        return layer_budgets(torch.tensor(self.weights, dtype=torch.float64), views, per_head)
