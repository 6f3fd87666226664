"""Turn per-head scores and budgets into kept positions: the one selection rule all policies share.

Priority is: sink tokens first, then the recent window, then the highest scores; ties go to the
earlier position. Protected tokens count inside the budget, so a budget is met exactly.
"""

from __future__ import annotations

import torch


def protected_priority(positions: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """[n] int: 2 for sinks, 1 for the recent window, 0 for everything else.

    Decided by absolute position (the first `sinks` positions, the last `recent` ones up to the
    newest cached token), not by index, so a cache that has already evicted tokens protects the same
    tokens as one that still spans every position.
    """
    priority = torch.zeros(positions.shape[0], dtype=torch.int64)
    if positions.numel() == 0:
        return priority
    if recent:
        priority[positions > positions[-1] - recent] = 1
    priority[positions < sinks] = 2
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


def drop_lowest(scores: torch.Tensor, priority: torch.Tensor, present: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """[kv_heads, n] bool: `present` less, on each head where `drop` [kv_heads] is True, the one token
    `keep_mask` would rank last among those present: the lowest priority, then the lowest score,
    then the latest position.

    A decode step usually takes each head one token over its budget; this finds that token in one
    pass instead of two sorts. It is `keep_mask` exactly when every present score is above -inf and
    no score is NaN (the caller checks), since those are where a sort's order needs more care.
    """
    lowest_priority = priority.expand_as(scores).masked_fill(~present, torch.iinfo(torch.int64).max)
    candidates = lowest_priority == lowest_priority.amin(1, keepdim=True)
    lowest = scores.masked_fill(~candidates, float("inf")).amin(1, keepdim=True)
    at = ((candidates & (scores == lowest)) * torch.arange(scores.shape[1])).argmax(1)
    kept = present.clone()
    kept[drop, at[drop]] = False
    return kept
