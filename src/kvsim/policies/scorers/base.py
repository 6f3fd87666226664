"""The scorer interface and the small tensor steps several scorers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsim.policies.parts import Part, check
from kvsim.policies.view import CacheView

POOLS = ("avg", "max", "none")
GQA_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class Scorer(Part):
    """Importance of every cached token, per KV head: higher means keep."""

    kind: ClassVar[str] = "scorer"

    def score(self, view: CacheView) -> torch.Tensor:
        """[kv_heads, n] float32 scores for the tokens of `view`."""
        raise NotImplementedError


def pool_scores(scores: torch.Tensor, how: str, kernel: int) -> torch.Tensor:
    """Smooth scores along positions so a heavy hitter's neighbours are kept with it.

    Matches the reference codes: avg pooling counts the zero padding (`count_include_pad`), max
    pooling pads with -inf; both keep the length (odd kernel, stride 1).
    """
    if how == "none" or kernel <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    if how == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(scores.shape)


def check_pooling(part: Part, pool: str, kernel: int, gqa: str) -> None:
    check(pool in POOLS, part, f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    check(kernel >= 1 and kernel % 2 == 1, part, f"kernel must be an odd number >= 1, got {kernel}")
    check(gqa in GQA_REDUCTIONS, part, f"gqa must be one of {', '.join(GQA_REDUCTIONS)}, got {gqa!r}")


def suggest_pooling(trial, prefix: str) -> dict:
    return {
        "pool": trial.suggest_categorical(f"{prefix}pool", list(POOLS)),
        "kernel": trial.suggest_categorical(f"{prefix}kernel", [1, 3, 5, 7, 9]),
        "gqa": trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS)),
    }
