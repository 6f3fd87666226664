"""Apply a policy to a whole cache: score every layer, allocate, select. The simulator and the live
cache both call these, which is what makes their decisions identical."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsim.policies.allocators.base import Protected
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.policies.selection import drop_lowest, keep_mask, protected_priority
from kvsim.policies.view import CacheView


def allocate(policy: Policy, views: Sequence[CacheView], budget: Budget, prompt_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(scores per layer [kv_heads, n], budgets [n_layers, kv_heads]) at the end of prefill. The
    allocator reads the tokens it must leave to the schedule's protection from the schedule."""
    scores = [policy.scorer.score(view) for view in views]
    protected = Protected(policy.schedule.sinks, policy.schedule.recent)
    budgets = policy.allocator.allocate(views, scores, budget.per_head(prompt_len), protected)
    return scores, budgets


def select(policy: Policy, view: CacheView, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """[kv_heads, n] bool kept tokens of one layer, sinks and recent window first.

    The recent window is counted in positions from the newest cached token, and tokens a head no
    longer holds (`view.present`) are never kept again. A decode step that takes no head more than
    one token over its budget drops that token directly (`drop_lowest`, the same choice).
    """
    schedule = policy.schedule
    priority = protected_priority(view.positions, schedule.sinks, schedule.recent)
    if view.present is None:
        return keep_mask(scores, budgets, priority)
    over = view.present.sum(1) - budgets
    if int(over.max()) <= 1 and bool((scores.masked_fill(~view.present, 0.0) > float("-inf")).all()):
        return drop_lowest(scores, priority, view.present, over > 0)
    scores = scores.masked_fill(~view.present, float("-inf"))
    return keep_mask(scores, budgets, priority * view.present) & view.present


def compress_prefill(policy: Policy, views: Sequence[CacheView], budget: Budget, prompt_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(full-precision kept mask per layer [kv_heads, n], budgets [n_layers, kv_heads]). A retention
    that spends part of the budget on low precision keeps fewer at full precision (`full_budgets`)."""
    scores, budgets = allocate(policy, views, budget, prompt_len)
    return [select(policy, view, s, policy.retention.full_budgets(b)) for view, s, b in zip(views, scores, budgets)], budgets
