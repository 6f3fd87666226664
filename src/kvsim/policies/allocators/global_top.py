"""Global top-k: every layer and KV head competes for the whole cache's budget by score (KVzip).

KVzip (Kim et al., 2025, arXiv 2505.23416; kvpress KVzipPress with `layerwise=False`, its
default): the lowest-scoring (layer, head, token) triples of the whole model are evicted, so a
head's budget is how many of its tokens are among the model's top n_layers · kv_heads · B. That
is Ada-KV's head competition (`head_adaptive` with alpha 0) widened from one layer to all of
them, and it only makes sense for scores comparable across layers, such as KVzip's attention
maxima. Each head first keeps its single best token, so no head is ever empty (KVzip's sink tokens
carry the top score, so with them this changes nothing).

No parameters. Returns [n_layers, kv_heads] int64 summing to n_layers · kv_heads · per_head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected
from kvsim.policies.parts import register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class GlobalTop(Allocator):
    name = "global_top"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        n_layers, kv_heads = len(views), views[0].kv_heads
        width = max(view.length for view in views)
        table = torch.full((n_layers * kv_heads, width), float("-inf"), dtype=torch.float64)
        for layer, layer_scores in enumerate(scores):
            table[layer * kv_heads : (layer + 1) * kv_heads, : layer_scores.shape[1]] = layer_scores.double()
        best = table.argmax(1)
        table[torch.arange(table.shape[0]), best] = float("-inf")  # each head's best is already kept
        caps = torch.tensor([view.length for view in views]).repeat_interleave(kv_heads)
        rest = min(n_layers * kv_heads * per_head, int(caps.sum())) - table.shape[0]
        winners = torch.topk(table.flatten(), max(rest, 0)).indices
        counts = 1 + torch.bincount(winners // width, minlength=table.shape[0])
        return counts.reshape(n_layers, kv_heads)
