"""Expected Attention (Devoto et al., 2025, arXiv 2510.00636; kvpress ExpectedAttentionPress).

Scores the attention that *future* queries are expected to pay each key, without seeing them: the
recent queries, taken back to before RoPE, give a mean μ and covariance Σ per query head; averaging
the RoPE rotation over the next `future` positions (R̄) moves them forward (μ' = R̄μ, Σ' = R̄ΣR̄ᵀ);
for a Gaussian query q, E[exp(q·k/√d)] = exp(μ'·k/√d + kᵀΣ'k/2d), softmaxed over the keys,
averaged over the GQA group, and multiplied by ‖v‖ (the size of what the token would write).
The first `sinks` tokens are left out of the statistics and of the softmax and always kept.

Parameters:
    window (32; the SnapKV family's window): recent queries the statistics come from; kvpress uses every prompt query after
        the sinks, which a window of prompt length − sinks reproduces exactly.
    future (512): positions ahead the rotation is averaged over.
    sinks (4), covariance (True), value_norm (True), epsilon (0.0): as in kvpress.
    gqa ("mean"; kvpress), pool ("none"), kernel (1).

Returns [kv_heads, n] float32. Needs the model's RoPE (`view.rope`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError
from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import GQA_REDUCTIONS, Scorer, check_pooling, pool_scores, protect_sinks, suggest_pool, unpooled
from kvsim.policies.view import CacheView, reduce_group


@register
@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    name = "expected_attention"
    window: int = 32
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = 0.0
    gqa: str = "mean"
    pool: str = "none"
    kernel: int = 1

    def validate(self) -> None:
        check(self.window >= 2, self, f"window must be >= 2 (a covariance needs two queries), got {self.window}")
        check(self.future >= 1, self, f"future must be >= 1, got {self.future}")
        check(self.sinks >= 0, self, f"sinks must be >= 0, got {self.sinks}")
        check(self.epsilon >= 0, self, f"epsilon must be >= 0, got {self.epsilon}")
        check_pooling(self, self.pool, self.kernel, self.gqa)

    @classmethod
    def suggest(cls, trial, prefix: str) -> ExpectedAttention:
        return cls(
            window=trial.suggest_categorical(f"{prefix}window", [16, 32, 64]),
            future=trial.suggest_categorical(f"{prefix}future", [32, 128, 512]),
            covariance=trial.suggest_categorical(f"{prefix}covariance", [False, True]),
            value_norm=trial.suggest_categorical(f"{prefix}value_norm", [False, True]),
            gqa=trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS)),
            **suggest_pool(trial, prefix),
        )

    @property
    def per_head(self) -> bool:
        return unpooled(self.pool, self.kernel)

    def score(self, view: CacheView) -> torch.Tensor:
        mean, cov = self._future_query_statistics(view)
        keys = view.keys.float()
        group = view.heads // view.kv_heads
        k = keys[:, None].expand(-1, group, -1, -1)  # [kv, group, n, d] (a view, no copy)
        logits = torch.einsum("hgnd,hgd->hgn", k, mean.reshape(view.kv_heads, group, -1)) * view.scaling
        if cov is not None:
            cov = cov.reshape(view.kv_heads, group, *cov.shape[-2:])
            logits = logits + (torch.matmul(k, cov) * k).sum(-1) * view.scaling**2 / 2
        hidden = (view.positions < self.sinks)[None, None, :]
        if view.present is not None:
            hidden = hidden | ~view.present[:, None, :]
        expected = logits.masked_fill(hidden, float("-inf")).softmax(-1).reshape(view.heads, -1)
        scores = reduce_group(pool_scores(expected, self.pool, self.kernel), view.kv_heads, self.gqa)
        if self.value_norm:
            scores = (scores + self.epsilon) * torch.linalg.vector_norm(view.values.float(), dim=-1)
        return protect_sinks(scores, view.positions, self.sinks)

    def _future_query_statistics(self, view: CacheView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """μ' [heads, d] and Σ' [heads, d, d] (or None) of the queries expected after the view."""
        if view.rope is None:
            raise KvsimError(
                "expected_attention needs the model's RoPE frequencies, which this TraceSet lacks: re-capture it with this kvsim"
            )
        positions = view.query_positions[-self.window :]
        observed = positions >= self.sinks
        queries = view.rope.unrotate(view.queries[:, -self.window :].float(), positions)[:, observed]
        mean = queries.mean(1)
        next_position = int(view.query_positions[-1]) + 1
        rotation = view.rope.mean_rotation(torch.arange(next_position, next_position + self.future))
        cov = None
        if self.covariance:
            centered = queries - mean[:, None]
            cov = rotation @ (centered.transpose(1, 2) @ centered / queries.shape[1]) @ rotation.T
        return mean @ rotation.T, cov
