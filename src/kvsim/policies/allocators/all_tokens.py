"""Keep every token: the full-cache reference (`full` preset).

The only allocator that ignores the budget: every layer and KV head keeps its whole cache, so it
does not meet the budget rule's total and its results are the upper reference, not a point on a
budget curve.

No parameters. Returns [n_layers, kv_heads] int64, each entry its layer's cached length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, layer_caps
from kvsim.policies.parts import register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class AllTokens(Allocator):
    name = "all_tokens"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        return layer_caps(views)
