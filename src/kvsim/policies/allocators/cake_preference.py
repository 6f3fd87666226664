"""Layer preference from attention dispersion and shift (CAKE).

CAKE (Qin et al., ICLR 2025; antgroup/cakekv `cake/cake_cache.py`, `cake/utils.py`): from the
window attention A [heads, window, n] restricted to the prefix columns (keys before the window's
first query; rows then no longer sum to 1), per layer

    H_l = − Σ_{h,i,j} A log(A + 1e−10)        spatial dispersion (entropy, summed)
    V_l =   Σ_{h,j} Var_i A[h, i, j]           temporal shift (unbiased variance over the rows)
    P_l = H_l^(1/tau1) · V_l^(1/tau2)

Layers with spread-out, shifting attention get more cache. As in the reference the pool excludes
the protected tokens: layer l gets P_l / Σ_k P_k · L · (B − w) + w tokens, w = the schedule's sinks
+ recent window (counted inside the budget B; the reference reserves its observation window, which
the CAKE preset protects as its recent window), apportioned exactly; caps at the layer length are
redistributed. Every KV head of a layer gets the layer's budget.

This is CAKE's non-cascading mode: the preference of every layer is known before any layer is
allocated (the paper's memory-bounded cascading mode re-splits the pool layer by layer during
prefill; with all layers' scores at hand both end at these budgets up to the reference's rounding).

Parameters:
    window (32): window queries whose attention gives the preference.
    tau1, tau2 (1.0, 1.0): temperatures of the two terms. The reference tunes them per model and
        budget (model2tau.json, e.g. Llama-3.1-8B at B = 1024: 1.6, 0.4) and falls back to 1.0.

Returns [n_layers, kv_heads] int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.allocators.base import Allocator, Protected, reserve_then_share
from kvsim.policies.parts import check, register
from kvsim.policies.scorers.cake_indicator import prefix_length
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class CakePreference(Allocator):
    name = "cake_preference"
    window: int = 32
    tau1: float = 1.0
    tau2: float = 1.0

    def validate(self) -> None:
        check(self.window >= 2, self, f"window must be >= 2 (the variance needs two queries), got {self.window}")
        check(self.tau1 > 0, self, f"tau1 must be > 0, got {self.tau1}")
        check(self.tau2 > 0, self, f"tau2 must be > 0, got {self.tau2}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> CakePreference:
        return cls(
            window=trial.suggest_categorical(f"{prefix}window", [8, 16, 32, 64]),
            tau1=trial.suggest_float(f"{prefix}tau1", 0.2, 5.0, log=True),
            tau2=trial.suggest_float(f"{prefix}tau2", 0.2, 5.0, log=True),
        )

    def allocate(
        self, views: Sequence[CacheView], scores: Sequence[torch.Tensor], per_head: int, protected: Protected = Protected()
    ) -> torch.Tensor:
        preference = torch.stack([self.preference(view) for view in views])
        return reserve_then_share(preference, views, per_head, protected.reserved(per_head))

    def preference(self, view: CacheView) -> torch.Tensor:
        """Scalar float64 P_l of one layer."""
        attention = view.window(self.window)[..., : prefix_length(view, self.window)].double()
        if attention.shape[-1] == 0:
            return torch.zeros((), dtype=torch.float64)
        dispersion = -(attention * torch.log(attention + 1e-10)).sum()
        shift = attention.var(dim=1).sum()
        return dispersion ** (1 / self.tau1) * shift ** (1 / self.tau2)
