"""`simulate(traceset, policies, budgets)`: every policy at every budget on every sample, as tables.

Per sample, the work no policy changes (loading the trace, the prefill views with their window
attention, the continuation's full-cache attention) is done once and shared by all policies and
budgets; only one sample's tensors are in memory at a time.

`sim_score` is the single number search maximizes: 1 − the mean over layers of the relative
attention-output error (clipped at 1), i.e. the share of the attention output the compressed
cache preserves. It sees what recall cannot: merged and low-precision tokens that are kept but
changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.sim.continuation import continuation_attention, prefill_view
from kvsim.sim.oracle import oracle_keeps
from kvsim.sim.replay import LayerOutcome, replay, replay_selection
from kvsim.traces.store import TraceSample, TraceSet

ORACLE = "oracle"


@dataclass
class Simulation:
    """layers: one row per (sample, mode, policy, budget, layer); samples: the per-sample aggregates."""

    layers: pl.DataFrame
    samples: pl.DataFrame


def simulate(
    traceset: TraceSet,
    policies: Sequence[Policy],
    budgets: Sequence[Budget | float | int],
    *,
    mode: str | None = None,
    oracle: bool = True,
    on_sample: Callable[[TraceSample], None] = lambda sample: None,
) -> Simulation:
    budgets = [b if isinstance(b, Budget) else Budget(b) for b in budgets]
    for policy in policies:
        policy.check_traces(traceset.n_layers, traceset.meta["window"])
    rows = []
    for sample in traceset.samples(mode):
        rows += simulate_sample(traceset, sample, policies, budgets, oracle)
        on_sample(sample)
    layers = pl.DataFrame(rows, schema=LAYER_SCHEMA)
    return Simulation(layers, summarize(layers, traceset))


def simulate_sample(
    traceset: TraceSet, sample: TraceSample, policies: Sequence[Policy], budgets: Iterable[Budget], oracle: bool
) -> list[dict]:
    n_layers, window = traceset.n_layers, traceset.meta["window"]
    views = [prefill_view(sample, layer, n_layers, window) for layer in range(n_layers)]
    fulls = [continuation_attention(sample, layer, window) for layer in range(n_layers)]
    rows = []
    for budget in budgets:
        budget.per_head(sample.prompt_len)  # a budget above the prompt is an error, not a silent cap
        for policy in policies:
            rows += _rows(sample, policy.name, budget, replay(policy, budget, views, fulls))
        if oracle:
            rows += _rows(sample, ORACLE, budget, replay_selection(oracle_keeps(fulls, budget), views, fulls))
    return rows


LAYER_SCHEMA = {
    "sample_id": pl.String,
    "mode": pl.String,
    "task": pl.String,
    "policy": pl.String,
    "budget": pl.String,
    "layer": pl.Int64,
    "attn_recall": pl.Float64,
    "out_err": pl.Float64,
    "evidence_recall": pl.Float64,
    "kept_tokens": pl.Int64,
    "low_precision_tokens": pl.Int64,
    "kv_bytes": pl.Int64,
}


def _rows(sample: TraceSample, policy: str, budget: Budget, outcomes: list[LayerOutcome]) -> list[dict]:
    return [
        {
            "sample_id": sample.sample_id,
            "mode": sample.mode,
            "task": sample.task,
            "policy": policy,
            "budget": budget.label,
            "layer": outcome.layer,
            **outcome.metrics.means(),
            "kept_tokens": outcome.kept_tokens,
            "low_precision_tokens": outcome.low_precision_tokens,
            "kv_bytes": outcome.kv_bytes,
        }
        for outcome in outcomes
    ]


def summarize(layers: pl.DataFrame, traceset: TraceSet) -> pl.DataFrame:
    """One row per (sample, mode, policy, budget), with the full-cache task score beside it."""
    full_scores = traceset.manifest.select("sample_id", "mode", pl.col("score").alias("full_cache_score"))
    return (
        layers.group_by("sample_id", "mode", "task", "policy", "budget", maintain_order=True)
        .agg(
            pl.col("attn_recall").mean(),
            pl.col("out_err").mean(),
            pl.col("evidence_recall").mean(),
            pl.col("kv_bytes").sum(),
            (1 - pl.col("out_err").clip(upper_bound=1.0)).mean().alias("sim_score"),
        )
        .join(full_scores, on=["sample_id", "mode"], how="left")
    )
