"""A weighted mixture of scorers, each normalised per head first (kvsim's own).

Published scorers each see one signal: the observation window's attention (SnapKV), attention
accumulated over the prompt (H2O), the key norm (Knorm), recency (StreamingLLM). Mixing two or
three lets search find a combination none of them is alone, as EMS (arXiv 2412.08521) mixes a
global and a local score and CAKE mixes an attention mean with its variance. Scores of different
scorers live on unrelated scales (probabilities, norms, positions), so each component is first
normalised per KV head, over the tokens the head holds:

- `rank` (default): a token's rank among the head's tokens, mapped to [0, 1] (best 1, ties to
  the earlier position, as the selection breaks them). Scale-free and robust to the heavy tails
  of attention, so a weight means the same whatever the component; it drops how far apart two
  scores are.
- `z`: (score − mean) / standard deviation. Keeps the margins, so one dominant heavy hitter stays
  dominant, at the price of letting a few outliers decide.

Score = Σ_i weight_i · normalised_i / Σ_i weight_i.

Spec: `{"name": "mixture", "scorers": [{"name": "window_attention", ...}, {"name": "key_norm"}],
"weights": [0.7, 0.3], "normalize": "rank"}`; the component specs nest as any scorer spec does.

Search: `suggest` draws 2 or 3 components from every registered scorer except `mixture` itself
and `random` (noise, not a signal), each with its own parameters under `<prefix><i>.<name>.`, and
a weight in [0.05, 1] each, so scorers registered later join the space without a change here.
Returns [kv_heads, n] float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsim.policies.parts import REGISTRY, check, register
from kvsim.policies.scorers.base import Scorer
from kvsim.policies.scorers.random_scores import RandomScores
from kvsim.policies.view import CacheView

NORMALIZATIONS = ("rank", "z")


@register
@dataclass(frozen=True)
class Mixture(Scorer):
    name = "mixture"
    scorers: tuple[Scorer, ...] = ()
    weights: tuple[float, ...] = ()
    normalize: str = "rank"

    def validate(self) -> None:
        check(len(self.scorers) >= 2, self, f"scorers must list at least two scorers to mix, got {len(self.scorers)}")
        check(len(self.weights) == len(self.scorers), self, f"weights must give one weight per scorer: {len(self.scorers)} scorers, {len(self.weights)} weights")
        check(all(math.isfinite(w) and w > 0 for w in self.weights), self, f"weights must all be positive finite numbers, got {list(self.weights)}")
        check(self.normalize in NORMALIZATIONS, self, f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")

    @property
    def window(self) -> int:
        """The longest observation window a component reads (what `Policy.observation_window` asks)."""
        return max(getattr(scorer, "window", 0) for scorer in self.scorers)

    @property
    def per_head(self) -> bool:
        return all(scorer.per_head for scorer in self.scorers)

    @classmethod
    def suggest(cls, trial, prefix: str) -> Mixture:
        names = sorted(name for name, part in REGISTRY["scorer"].items() if part not in (cls, RandomScores))
        scorers, weights = [], []
        for i in range(trial.suggest_int(f"{prefix}components", 2, 3)):
            name = trial.suggest_categorical(f"{prefix}{i}.scorer", names)
            scorers.append(REGISTRY["scorer"][name].suggest(trial, f"{prefix}{i}.{name}."))
            weights.append(trial.suggest_float(f"{prefix}{i}.weight", 0.05, 1.0))
        return cls(scorers=tuple(scorers), weights=tuple(weights), normalize=trial.suggest_categorical(f"{prefix}normalize", list(NORMALIZATIONS)))

    def trial_params(self, prefix: str) -> dict:
        params = {f"{prefix}components": len(self.scorers), f"{prefix}normalize": self.normalize}
        for i, (scorer, weight) in enumerate(zip(self.scorers, self.weights)):
            params |= {f"{prefix}{i}.scorer": scorer.name, f"{prefix}{i}.weight": weight, **scorer.trial_params(f"{prefix}{i}.{scorer.name}.")}
        return params

    def score(self, view: CacheView) -> torch.Tensor:
        held = torch.ones(view.kv_heads, view.length, dtype=torch.bool) if view.present is None else view.present
        normalise = rank_normalized if self.normalize == "rank" else z_normalized
        total = sum(weight * normalise(scorer.score(view).float(), held) for scorer, weight in zip(self.scorers, self.weights))
        return total / sum(self.weights)


def rank_normalized(scores: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """[kv_heads, n]: each held token's rank among its head's held tokens, best 1, worst 0; ties
    rank the earlier position higher. Tokens a head does not hold rank below all it holds."""
    order = torch.sort(scores.masked_fill(~held, float("-inf")), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    count = held.sum(-1, keepdim=True)
    return 1 - ranks.float() / (count - 1).clamp(min=1)


def z_normalized(scores: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """[kv_heads, n]: (score − mean) / std over each head's held tokens (0 where a head's scores are flat)."""
    count = held.sum(-1, keepdim=True).clamp(min=1)
    kept = scores.masked_fill(~held, 0.0)
    mean = kept.sum(-1, keepdim=True) / count
    std = (((kept - mean) ** 2).masked_fill(~held, 0.0).sum(-1, keepdim=True) / count).sqrt()
    return torch.where(std > 0, (scores - mean) / std.clamp(min=1e-12), torch.zeros_like(scores))
