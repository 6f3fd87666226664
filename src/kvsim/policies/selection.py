"""Turn per-head scores and budgets into kept positions: the one selection rule all policies share.

Priority is: sink tokens first, then the recent window, then the highest scores; ties go to the
earlier position. Protected tokens count inside the budget, so a budget is met exactly.
"""

from __future__ import annotations

import torch


def protected_priority(length: int, sinks: int, recent: int) -> torch.Tensor:
    """[length] int: 2 for sinks, 1 for the recent window, 0 for everything else."""
    priority = torch.zeros(length, dtype=torch.int64)
    if recent:
        priority[max(0, length - recent) :] = 1
    priority[: min(sinks, length)] = 2
    return priority


def keep_mask(scores: torch.Tensor, budgets: torch.Tensor, priority: torch.Tensor | None = None) -> torch.Tensor:
    """[kv_heads, n] bool: for each head, its `budgets[h]` best tokens by (priority, score).

    scores: [kv_heads, n]; budgets: [kv_heads] ints in [0, n]; priority: [n], [kv_heads, n] or None.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if priority is not None:
        ranked_priority = priority.expand_as(scores).gather(-1, order)
        by_priority = torch.sort(ranked_priority, dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, by_priority)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    return ranks < budgets[:, None]
