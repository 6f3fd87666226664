"""The allocator interface and the integer apportionment every allocator ends with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from kvsim.policies.parts import Part
from kvsim.policies.view import CacheView


class Protected(NamedTuple):
    """The tokens the policy's schedule never evicts: the first `sinks` positions and the last
    `recent` ones. They count inside every budget; allocators that keep them out of a competition
    (a pyramid, head shares, a preference) read them here, so they are declared once, on the
    schedule."""

    sinks: int = 0
    recent: int = 0

    def reserved(self, per_head: int) -> int:
        """Tokens of a `per_head` budget that go to protected tokens."""
        return min(self.sinks + self.recent, per_head)


# Sentinel for parameters that moved to the schedule: a spec naming them is refused with the fix.
MOVED_TO_SCHEDULE = "the protected tokens are the schedule's sinks and recent window: set them there and remove it here"


@dataclass(frozen=True)
class Allocator(Part):
    """Splits the cache's total budget into per-layer, per-KV-head token counts."""

    kind: ClassVar[str] = "allocator"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        """[n_layers, kv_heads] int64 budgets summing exactly to n_layers · kv_heads · per_head,
        each within [0, that layer's cached length]. `scores` are the scorer's [kv_heads, n] per
        layer; `protected` the schedule's sinks and recent window (`kvsim.policies.compress.allocate`)."""
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


def proportional(weights: torch.Tensor, total: int, caps: torch.Tensor, floor: int = 1) -> torch.Tensor:
    """Integer budgets as close as possible to total · weights / Σ weights, within [floor, caps].

    `apportion` hands out the floor first and splits only the rest by weight, which moves
    proportional shares by up to a token each; here an entry is raised to the floor only when its
    proportional share is below it, and the others give back in proportion to what they hold above
    the floor (so weights 1, 2, 3 of 30 are exactly 5, 10, 15).
    """
    weights = weights.double().clamp(min=0)
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    ideal = weights / weights.sum() * total
    return apportion((ideal - floor).clamp(min=0), total, caps, floor)


def layer_budgets(weights: torch.Tensor, views: Sequence[CacheView], per_head: int, floor: int = 1) -> torch.Tensor:
    """[n_layers, kv_heads]: one budget per layer, proportional to `weights` [n_layers] (see
    `proportional`), shared by all KV heads of the layer, summing exactly to
    n_layers · kv_heads · per_head."""
    caps = torch.tensor([view.length for view in views], dtype=torch.int64)
    per_layer = proportional(weights, per_head * len(views), caps, floor)
    return per_layer[:, None].expand(-1, views[0].kv_heads).contiguous()


def reserve_then_share(preference: torch.Tensor, views: Sequence[CacheView], per_head: int, reserved: int) -> torch.Tensor:
    """[n_layers, kv_heads]: every layer keeps its `reserved` protected tokens, and the rest of the
    total, L · (per_head − reserved), is split in proportion to `preference` [n_layers] (CAKE's
    B_l = P_l / Σ P · L · (B − w) + w; uniform when no layer has any preference)."""
    if preference.sum() <= 0:
        preference = torch.ones_like(preference)
    weights = preference / preference.sum() * len(views) * (per_head - reserved) + reserved
    return layer_budgets(weights, views, per_head)
