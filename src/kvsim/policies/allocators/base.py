"""The allocator interface and the integer apportionment every allocator ends with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsim.policies.parts import Part
from kvsim.policies.view import CacheView


@dataclass(frozen=True)
class Allocator(Part):
    """Splits the cache's total budget into per-layer, per-KV-head token counts."""

    kind: ClassVar[str] = "allocator"

    def allocate(self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int) -> torch.Tensor:
        """[n_layers, kv_heads] int64 budgets summing exactly to n_layers · kv_heads · per_head,
        each within [0, that layer's cached length]. `scores` are the scorer's [kv_heads, n] per layer."""
        raise NotImplementedError


def apportion(weights: torch.Tensor, total: int, caps: torch.Tensor, floor: int = 1) -> torch.Tensor:
    """Integer budgets proportional to `weights` that sum exactly to `total`, within [floor, caps].

    Largest-remainder rounding; shares above a cap are given back and spread over the uncapped
    entries, repeatedly, so the total holds whenever it fits under the caps.
    """
    weights = weights.double().clamp(min=0)
    caps = caps.to(torch.int64)
    total = min(total, int(caps.sum()))
    floor_budgets = torch.minimum(torch.full_like(caps, floor), caps)
    budgets = floor_budgets.clone()
    remaining = total - int(budgets.sum())
    while remaining > 0:
        open_ = budgets < caps
        share = torch.where(open_, weights, torch.zeros_like(weights))
        if share.sum() <= 0:
            share = open_.double()
        ideal = share / share.sum() * remaining
        grant = torch.minimum(ideal.floor().to(torch.int64), caps - budgets)
        leftover = remaining - int(grant.sum())
        if leftover > 0:
            fraction = torch.where(open_ & (budgets + grant < caps), ideal - ideal.floor(), torch.full_like(ideal, -1.0))
            order = torch.sort(fraction.flatten(), descending=True, stable=True).indices[:leftover]
            extra = torch.zeros(fraction.numel(), dtype=torch.int64)
            extra[order[fraction.flatten()[order] >= 0]] = 1
            grant += extra.reshape(grant.shape)
        if int(grant.sum()) == 0:
            break
        budgets += grant
        remaining = total - int(budgets.sum())
    return budgets


def layer_caps(views: Sequence[CacheView]) -> torch.Tensor:
    """[n_layers, kv_heads]: no head can keep more tokens than its layer holds."""
    return torch.tensor([[view.length] * view.kv_heads for view in views], dtype=torch.int64)
