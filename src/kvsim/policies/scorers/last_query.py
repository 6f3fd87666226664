"""Attention of the newest query, averaged over the layer's heads (TOVA).

TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104; schwartz-lab-NLP/
TOVA `src/tova_cache.py`): score = mean over all query heads of the layer of the last query's
attention, `mean(attn[:, :, -1, :], dim=1)`. The selection is layer-wise: every KV head gets the
same score, so with a uniform allocator all heads keep one shared set. TOVA protects no sinks or
recent window (the newest token usually scores high on its own).

No parameters. Returns [kv_heads, n] float32, identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import register
from kvsim.policies.scorers.base import Scorer
from kvsim.policies.view import CacheView, layer_mean


@register
@dataclass(frozen=True)
class LastQuery(Scorer):
    name = "last_query"
    per_head = True

    def score(self, view: CacheView) -> torch.Tensor:
        return layer_mean(view.window(1)[:, 0], view)
