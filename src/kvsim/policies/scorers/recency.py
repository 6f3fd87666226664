"""Recency: newer tokens score higher (StreamingLLM's recent window; RazorAttention's local heads).

StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453) keeps the first `sinks` tokens and the
most recent ones. Score = absolute position, so with the schedule's sinks protected the top of
the budget is exactly "sinks + the most recent tokens", whatever each head's budget is.
Unlike the reference's pos-shift patch, positions are not re-indexed inside the cache (kvsim keeps
post-RoPE keys at their true positions).

No parameters. Returns [kv_heads, n] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import register
from kvsim.policies.scorers.base import Scorer
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class Recency(Scorer):
    name = "recency"
    per_head = True

    def score(self, view: CacheView) -> torch.Tensor:
        return view.positions.float().expand(view.kv_heads, -1).contiguous()
