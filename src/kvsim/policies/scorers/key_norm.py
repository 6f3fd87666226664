"""Key norm (kvpress KnormPress; Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", arXiv 2406.11430).

Keys with a low L2 norm tend to receive high attention, so score = −‖k‖₂: low-norm keys are kept.
Needs no attention at all.

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
class KeyNorm(Scorer):
    name = "key_norm"
    per_head = True

    def score(self, view: CacheView) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys.float(), dim=-1)
