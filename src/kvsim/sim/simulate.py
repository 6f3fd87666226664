"""`simulate(traceset, policies, budgets)`: every policy at every budget on every sample, as tables.

Per sample, the work no policy changes (loading the trace, the prefill views with their window
attention, the continuation's full-cache attention: read from format 4 TraceSets, computed for
older ones) is done once (`prepare_sample`) and shared by
all policies and budgets; only one sample's tensors are in memory at a time. Search keeps its
`PreparedSample`s for the whole study instead, so each trial pays only for its own replay.

Only the full-attention layers (`ModelShape.policy_layers`) are replayed: a sliding layer holds its
window whatever the policy, so its attention is the full cache's and it has nothing to report.

`sim_score` is the single number search maximizes: 1 − the mean over layers of the relative
attention-output error (clipped at 1), i.e. the share of the attention output the compressed
cache preserves. It sees what recall cannot: merged and low-precision tokens that are kept but
changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from kvsim.errors import KvsimError
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.policies.rope import Rotary
from kvsim.policies.presets import ORACLE
from kvsim.policies.view import CacheView
from kvsim.sim.continuation import ContinuationAttention, continuation_attention, prefill_view
from kvsim.sim.oracle import oracle_keeps
from kvsim.sim.replay import LayerOutcome, replay, replay_selection
from kvsim.traces.store import TraceSample, TraceSet


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
        policy.check_traces(policy_layer_count(traceset), traceset.meta["window"], traceset.statistics)
    rows = []
    for sample in traceset.samples(mode):
        rows += simulate_sample(traceset, sample, policies, budgets, oracle)
        on_sample(sample)
    layers = pl.DataFrame(rows, schema=LAYER_SCHEMA)
    return Simulation(layers, summarize(layers, traceset))


@dataclass
class PreparedSample:
    """One sample's policy-independent work: per layer, the prefill view and the full-cache
    attention of the continuation. Replaying any policy at any budget reads only these."""

    sample: TraceSample
    views: list[CacheView]
    fulls: list[ContinuationAttention]

    def replay(self, policy: Policy, budget: Budget) -> list[LayerOutcome]:
        budget.per_head(self.sample.prompt_len)  # a budget above the prompt is an error, not a silent cap
        return replay(policy, budget, self.views, self.fulls)

    def replay_oracle(self, budget: Budget) -> list[LayerOutcome]:
        budget.per_head(self.sample.prompt_len)
        return replay_selection(oracle_keeps(self.fulls, budget), self.views, self.fulls)


def policy_layer_count(traceset: TraceSet) -> int:
    """How many layers a policy decides on (the full-attention ones); refuses a model with none."""
    count = len(traceset.shape.policy_layers)
    if count == 0:
        raise KvsimError(
            f"{traceset.root}: every layer of {traceset.meta['model']['id']} is sliding-window attention, which holds "
            "its window whatever the policy: there is nothing to compress"
        )
    return count


def prepare_sample(traceset: TraceSet, sample: TraceSample) -> PreparedSample:
    shape, window = traceset.shape, traceset.meta["window"]
    policy_layer_count(traceset)
    rope = Rotary.from_meta(traceset.meta["model"].get("rope"))
    stored = sample.stored_reference() if traceset.stores_reference else None
    fulls = [
        continuation_attention(sample, layer, window, shape.scaling, None if stored is None else stored.layer(index))
        for index, layer in enumerate(shape.policy_layers)
    ]
    views = [prefill_view(sample, layer, shape, window, rope, full) for layer, full in zip(shape.policy_layers, fulls)]
    return PreparedSample(sample, views, fulls)


def simulate_sample(
    traceset: TraceSet, sample: TraceSample, policies: Sequence[Policy], budgets: Iterable[Budget], oracle: bool
) -> list[dict]:
    prepared = prepare_sample(traceset, sample)
    rows = []
    for budget in budgets:
        for policy in policies:
            rows += _rows(sample, policy.name, budget, prepared.replay(policy, budget))
        if oracle:
            rows += _rows(sample, ORACLE, budget, prepared.replay_oracle(budget))
    return rows


def sim_score(outcomes: Sequence[LayerOutcome]) -> float:
    """One sample's sim_score from its layer outcomes: the number `summarize` puts in its table
    (1 − mean over layers of min(out_err, 1)), without building tables (search calls this per trial)."""
    return sum(1.0 - min(outcome.metrics.means()["out_err"], 1.0) for outcome in outcomes) / len(outcomes)


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
