"""Retrieval heads keep everything, the rest keep a local window (RazorAttention, adapted).

RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891): a few "retrieval" heads (echo and
induction heads) need the whole context; every other head only needs sink tokens and a recent
buffer. The paper finds the retrieval heads offline, from a special forward pass over repeated
random tokens (echo/induction scores, top 14 % + 1 % of heads). Captured traces do not hold that
pass, so this is a **data-driven stand-in**: a (layer, KV head) pair is ranked by the share of its
window attention that lands outside the sinks and the local window,

    far_h = mean_{i in window} Σ_{j: index ≥ sinks, q_i − pos_j ≥ local} A[h, i, j]

(max over the query heads of the group, as the reference takes the max over a KV group), where
the sinks and the local window are the schedule's protected `sinks` and `recent` tokens (the
RazorAttention preset protects 4 sinks and a 32-token recent window), and the top
`retrieval_ratio` of all pairs (rounded, ties to the lower layer/head) are retrieval heads.

Budgets (exact total): retrieval heads get their full length, unless that would leave the others
less than min(B, sinks + local) each (at least one), in which case they share what is left above that; the other
heads share the rest uniformly. The paper's compensation token (the mean of the dropped keys and
values) is not modelled. Pair with the `recency` scorer, so that streaming heads keep the sinks
and then the most recent tokens.

Parameters: retrieval_ratio (0.15), window (32 queries).
Returns [n_layers, kv_heads] int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import MOVED_TO_SCHEDULE, Allocator, Protected, apportion, layer_caps
from kvsim.policies.parts import check, register
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class RetrievalHeads(Allocator):
    name = "retrieval_heads"
    retrieval_ratio: float = 0.15
    window: int = 32
    retired = {"sinks": MOVED_TO_SCHEDULE, "local": MOVED_TO_SCHEDULE}

    def validate(self) -> None:
        check(0.0 <= self.retrieval_ratio <= 1.0, self, f"retrieval_ratio must be in [0, 1], got {self.retrieval_ratio}")
        check(self.window >= 1, self, f"window must be >= 1, got {self.window}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> RetrievalHeads:
        return cls(
            retrieval_ratio=trial.suggest_float(f"{prefix}retrieval_ratio", 0.0, 0.5),
            window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]),
        )

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        caps = layer_caps(views).flatten()
        far = torch.cat([self.far_mass(view, protected) for view in views])  # [L · kv]
        count = math.floor(self.retrieval_ratio * far.numel() + 0.5)
        retrieval = torch.zeros(far.numel(), dtype=torch.bool)
        retrieval[torch.sort(far, descending=True, stable=True).indices[:count]] = True
        total = per_head * far.numel()
        streaming_min = max(1, protected.reserved(per_head))  # every head keeps a token, as `apportion` floors
        retrieval_total = min(int(caps[retrieval].sum()), total - streaming_min * int((~retrieval).sum()))
        budgets = torch.zeros_like(caps)
        if retrieval.any():
            budgets[retrieval] = apportion(torch.ones(count), retrieval_total, caps[retrieval])
        if (~retrieval).any():
            budgets[~retrieval] = apportion(torch.ones(far.numel() - count), total - retrieval_total, caps[~retrieval])
        return budgets.reshape(len(views), -1)

    def far_mass(self, view: CacheView, protected: Protected) -> torch.Tensor:
        """[kv_heads]: mean attention mass of the window queries beyond the sinks and local window."""
        attention = view.window(self.window)  # [heads, window, n]
        queries = view.query_positions[-self.window :]
        far = (queries[:, None] - view.positions[None, :]) >= protected.recent  # [window, n]
        far[:, : protected.sinks] = False
        per_query_head = (attention * far).sum(-1).mean(-1)  # [heads]
        return reduce_group(per_query_head, view.kv_heads, "max")
