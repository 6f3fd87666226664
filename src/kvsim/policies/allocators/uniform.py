"""Uniform allocation: every layer and KV head keeps the same number of tokens (SnapKV, H2O,
StreamingLLM, TOVA and most baselines)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, apportion, layer_caps
from kvsim.policies.parts import register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class Uniform(Allocator):
    name = "uniform"

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        caps = layer_caps(views)
        return apportion(torch.ones(caps.shape), per_head * caps.numel(), caps)
