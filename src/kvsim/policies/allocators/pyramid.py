"""Pyramid allocation: layer budgets decrease arithmetically with depth (PyramidKV).

PyramidKV (Cai et al., 2024, arXiv 2406.02069; Zefan-Cai/KVCache-Factory `PyramidKVCluster`):
attention is broad in low layers and concentrated in high ones, so low layers keep more. With
B = per-head budget, w = the schedule's protected tokens (sinks + recent window, counted inside B;
the reference's observation window, which the PyramidKV preset protects), b = B − w and n =
prefix length (cached length − w):

    min = b // beta,  max = 2b − min;   if max ≥ n: max = n, min = 2b − max
    step = (max − min) // (L − 1);      layer l keeps (max − l·step) + w

The budget here *includes* the window, as kvsim's budget rule says; the window is added back to
every layer as in the reference (so the top layers keep at least the window). The reference's
integer floor in `step` leaves its total slightly under L·B; here the layer sizes are used as
weights and apportioned so the total is exact (each layer moves by at most a token or two).
Every KV head of a layer gets the layer's budget.

Parameters:
    beta (20): ratio of the average prefix budget to the smallest layer's; must be >= 1.
    With nothing protected the pyramid spans the whole budget.

Returns [n_layers, kv_heads] int64, non-increasing over layers up to ±1 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import MOVED_TO_SCHEDULE, Allocator, Protected, layer_budgets
from kvsim.policies.parts import check, register
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class Pyramid(Allocator):
    name = "pyramid"
    beta: int = 20
    retired = {"recent": MOVED_TO_SCHEDULE}

    def validate(self) -> None:
        check(self.beta >= 1, self, f"beta must be >= 1, got {self.beta}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Pyramid:
        return cls(beta=trial.suggest_int(f"{prefix}beta", 1, 100, log=True))

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        sizes = pyramid_sizes(len(views), min(v.length for v in views), per_head, self.beta, protected.reserved(per_head))
        return layer_budgets(sizes, views, per_head)


def pyramid_sizes(n_layers: int, length: int, per_head: int, beta: int, reserved: int) -> torch.Tensor:
    """[n_layers] float64: PyramidKV's per-layer sizes (the `reserved` protected tokens included)
    before exact rounding."""
    reserved = min(reserved, per_head, length)
    base, prefix = per_head - reserved, length - reserved
    low = base // beta
    high = 2 * base - low
    if high >= prefix:
        high = prefix
        low = 2 * base - high
    step = (high - low) // (n_layers - 1) if n_layers > 1 else 0
    return torch.tensor([high - layer * step + reserved for layer in range(n_layers)], dtype=torch.float64)
