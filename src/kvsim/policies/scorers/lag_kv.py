"""LagKV (Liang et al., 2025, arXiv 2504.04704; kvpress LagKVPress): score a chunk by the next one.

After `sinks` tokens the prefix is cut into partitions of `lag` tokens. Each partition's keys (and
values) are min-max normalised per channel with the range of the *following* partition, the lag
reference; a token's score is the softmax over its partition of the standard deviation of its
normalised channels, averaged for keys and values: tokens that stand out against what comes next
are kept. The last (partial) partition has no reference and is kept whole, like the sinks. Without
`cross_scoring` the scores become ranks inside each partition divided by `lag` (kvpress's default),
so every partition keeps the same share. Prefixes shorter than sinks + 2 · lag are not compressed
by score: the scores rise with position, so the newest tokens are kept.

Parameters: sinks (4), lag (128), cross_scoring (False), pool ("none"), kernel (1).
Returns [kv_heads, n] float32. Prefill-once: positions are assumed to be 0 … n − 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import Scorer, check_pool, pool_scores, suggest_pool
from kvsim.policies.view import CacheView


@register
@dataclass(frozen=True)
class LagKV(Scorer):
    name = "lag_kv"
    sinks: int = 4
    lag: int = 128
    cross_scoring: bool = False
    pool: str = "none"
    kernel: int = 1

    def validate(self) -> None:
        check(self.sinks >= 0, self, f"sinks must be >= 0, got {self.sinks}")
        check(self.lag >= 2, self, f"lag must be >= 2, got {self.lag}")
        check_pool(self, self.pool, self.kernel)

    @classmethod
    def suggest(cls, trial, prefix: str) -> LagKV:
        return cls(
            sinks=trial.suggest_categorical(f"{prefix}sinks", [0, 4, 16]),
            lag=trial.suggest_categorical(f"{prefix}lag", [16, 32, 64, 128]),
            cross_scoring=trial.suggest_categorical(f"{prefix}cross_scoring", [False, True]),
            **suggest_pool(trial, prefix),
        )

    def score(self, view: CacheView) -> torch.Tensor:
        kv_heads, n = view.kv_heads, view.length
        if n < self.sinks + 2 * self.lag:
            ramp = torch.ones(kv_heads, n)
            ramp[:, self.sinks :] = torch.arange(max(n - self.sinks, 0)) / max(n - self.sinks, 1)  # n may be below sinks
            return pool_scores(ramp, self.pool, self.kernel)
        end = self.sinks + (n - self.sinks) // self.lag * self.lag
        scored = (self._states_score(view.keys[:, self.sinks : end]) + self._states_score(view.values[:, self.sinks : end])) / 2
        if not self.cross_scoring:
            scored = scored.argsort(-1).argsort(-1).float() / self.lag
        scores = torch.ones(kv_heads, n)
        scores[:, self.sinks : end - self.lag] = scored.reshape(kv_heads, -1)
        return pool_scores(scores, self.pool, self.kernel)

    def _states_score(self, states: torch.Tensor) -> torch.Tensor:
        """[kv, p·lag, d] -> [kv, p − 1, lag]: each partition against the range of the next one."""
        parts = states.float().reshape(states.shape[0], -1, self.lag, states.shape[-1])
        reference, scored = parts[:, 1:], parts[:, :-1]
        low, high = reference.amin(2, keepdim=True), reference.amax(2, keepdim=True)
        return ((scored - low) / (high - low)).std(-1).softmax(-1)
