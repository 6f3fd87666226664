"""Did the search win? The winner against every preset on the test samples, live, paired by sample.

Per budget (never pooled across budgets) and per preset, the difference winner − preset on the
same samples, with a 95 % percentile bootstrap interval of its mean, for the answer log-likelihood
(higher is better), the task score (higher) and KL to the full cache (lower). The best preset is
the one with the highest mean answer log-likelihood on these samples. The verdict is "beats"
when the interval of the answer log-likelihood difference against the best preset lies above
zero, "loses" when it lies below, and "within noise" otherwise.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

RESAMPLES = 2000
METRICS = ("answer_logprob", "score", "kl")


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % percentile bootstrap interval of the mean over samples."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return mean, means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


@dataclass(frozen=True)
class Comparison:
    budget: str
    winner: str
    preset: str
    samples: int
    differences: dict[str, tuple[float, float, float]]  # metric -> (mean, low, high) of winner − preset
    winner_means: dict[str, float]
    preset_means: dict[str, float]
    winner_kv_mib: float
    preset_kv_mib: float

    @property
    def verdict(self) -> str:
        _, low, high = self.differences["answer_logprob"]
        return "beats" if low > 0 else "loses" if high < 0 else "within noise"


def compare_with_presets(table: pl.DataFrame, winner: str) -> list[Comparison]:
    """One comparison per (budget, preset) where the winner ran; `full` is not a competitor."""
    comparisons = []
    for budget in sorted(set(table.filter(pl.col("policy") == winner)["budget"])):
        at_budget = table.filter(pl.col("budget") == budget)
        mine = {row["sample_id"]: row for row in at_budget.filter(pl.col("policy") == winner).iter_rows(named=True)}
        for preset in sorted(set(at_budget["policy"]) - {winner, "full"}):
            if preset.startswith("top"):
                continue
            theirs = {row["sample_id"]: row for row in at_budget.filter(pl.col("policy") == preset).iter_rows(named=True)}
            shared = sorted(mine.keys() & theirs.keys())
            if not shared:
                continue
            comparisons.append(Comparison(
                budget=budget,
                winner=winner,
                preset=preset,
                samples=len(shared),
                differences={m: bootstrap_ci([mine[s][m] - theirs[s][m] for s in shared]) for m in METRICS},
                winner_means={m: statistics.fmean(mine[s][m] for s in shared) for m in METRICS},
                preset_means={m: statistics.fmean(theirs[s][m] for s in shared) for m in METRICS},
                winner_kv_mib=statistics.fmean(mine[s]["kv_bytes"] for s in shared) / 2**20,
                preset_kv_mib=statistics.fmean(theirs[s]["kv_bytes"] for s in shared) / 2**20,
            ))
    return comparisons


def against_best_preset(comparisons: Sequence[Comparison]) -> dict[str, Comparison]:
    """Per budget, the comparison with the preset of the highest mean answer log-likelihood."""
    best: dict[str, Comparison] = {}
    for comparison in comparisons:
        current = best.get(comparison.budget)
        if current is None or comparison.preset_means["answer_logprob"] > current.preset_means["answer_logprob"]:
            best[comparison.budget] = comparison
    return best


PHRASES = {"beats": "beats", "loses": "loses to", "within noise": "is within noise of"}


def summary_line(comparison: Comparison) -> str:
    """One plain sentence a user can act on."""
    mean, low, high = comparison.differences["answer_logprob"]
    score = comparison.differences["score"][0]
    verbatim = comparison.winner.split("-", 1)[-1] == comparison.preset
    found = " (the winner is that preset verbatim: the search found nothing better)" if verbatim else ""
    return (
        f"budget {comparison.budget}: the winner {PHRASES[comparison.verdict]} the best preset ({comparison.preset}){found} on "
        f"{comparison.samples} test samples: answer log-likelihood {comparison.winner_means['answer_logprob']:.3f} vs "
        f"{comparison.preset_means['answer_logprob']:.3f} (difference {mean:+.3f}, 95% CI {low:+.3f} to {high:+.3f}); "
        f"task score {comparison.winner_means['score']:.2f} vs {comparison.preset_means['score']:.2f} ({score:+.2f}); "
        f"KL {comparison.winner_means['kl']:.3f} vs {comparison.preset_means['kl']:.3f}"
    )
