"""Accumulated attention (H2O; kvpress ObservedAttentionPress when normalized).

H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): a token's importance is the sum of the
attention it has received from every query so far — all prompt queries at the end of prefill,
plus every generated query after that (`view.colsum`). Early tokens are seen by more queries
under the causal mask and so accumulate more; with `normalize` each key's sum is divided by the
number of queries that could see it (kvpress ObservedAttentionPress), i.e. its mean attention.

Parameters:
    gqa ("mean"): how the query heads of a GQA group are combined into their KV head's score:
        "mean" or "max" (per KV head selection), or "layer": the mean over all query heads of the
        layer, the same score for every KV head, so all heads keep one shared set (PrefixKV's
        head-averaged score).
    normalize (False): divide by the number of queries that saw the key. At the end of a prompt
        of length N that is N − position; in general (max query position seen + 1) − position.

Returns [kv_heads, n] float32. Needs the view's column sums (captured traces hold them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError
from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import Scorer
from kvsim.policies.view import CacheView, layer_mean, reduce_group

ACCUMULATED_REDUCTIONS = ("mean", "max", "layer")


@register
@dataclass(frozen=True)
class AccumulatedAttention(Scorer):
    name = "accumulated_attention"
    per_head = True
    gqa: str = "mean"
    normalize: bool = False

    def validate(self) -> None:
        check(self.gqa in ACCUMULATED_REDUCTIONS, self, f"gqa must be one of {', '.join(ACCUMULATED_REDUCTIONS)}, got {self.gqa!r}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> AccumulatedAttention:
        return cls(
            gqa=trial.suggest_categorical(f"{prefix}gqa", list(ACCUMULATED_REDUCTIONS)),
            normalize=trial.suggest_categorical(f"{prefix}normalize", [False, True]),
        )

    def score(self, view: CacheView) -> torch.Tensor:
        per_query_head = accumulated(view, self.normalize)
        return reduce_heads(per_query_head, view, self.gqa)


def accumulated(view: CacheView, normalize: bool) -> torch.Tensor:
    """[heads, n] float32: Σ attention received per key, or its mean over the queries that saw it."""
    if view.colsum is None:
        raise KvsimError(
            f"layer {view.layer} has no accumulated attention statistics (colsum): "
            "capture the trace with column statistics, or use a window-based scorer"
        )
    colsum = view.colsum.float()
    if not normalize:
        return colsum
    return colsum / queries_seen(view)[None, :]


def queries_seen(view: CacheView) -> torch.Tensor:
    """[n] float32: how many queries so far could attend to each cached key (at least 1)."""
    seen = int(view.query_positions.max()) + 1
    return (seen - view.positions).clamp(min=1).float()


def reduce_heads(per_query_head: torch.Tensor, view: CacheView, how: str) -> torch.Tensor:
    """[heads, n] -> [kv_heads, n] by group mean/max, or the layer mean repeated for every KV head."""
    if how == "layer":
        return layer_mean(per_query_head, view)
    return reduce_group(per_query_head, view.kv_heads, how)
