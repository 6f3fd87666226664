"""The oracle: the best retained set in hindsight of the continuation's queries.

Mean attention recall over layers, KV heads' query heads and rows is linear in the kept set, with
each prompt token worth the full-cache attention mass the continuation gives it. So, for a total
budget, the top tokens by that mass across all layers and heads maximize it exactly: no online
policy with the same number of kept prompt tokens (and plain dropping) can recall more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsim.policies.budget import Budget
from kvsim.sim.continuation import ContinuationAttention


def oracle_keeps(fulls: Sequence[ContinuationAttention], budget: Budget) -> list[torch.Tensor]:
    """[kv_heads, prompt_len] kept masks per layer."""
    prompt = fulls[0].prompt_len
    mass = torch.stack([full.prompt_mass.sum(1) for full in fulls])  # [L, kv, P]
    layers, kv_heads, _ = mass.shape
    chosen = mass.flatten().topk(budget.total(prompt, layers, kv_heads)).indices
    keep = torch.zeros(mass.numel(), dtype=torch.bool)
    keep[chosen] = True
    return list(keep.reshape(mass.shape))
