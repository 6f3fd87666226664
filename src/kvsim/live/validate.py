"""Live validation: policies × budgets on trace samples, each live outcome beside the simulator's
prediction for the same (sample, policy, budget).

Each sample is prefilled once (`LiveSample`), the simulator replays it once for all policies, and
every (policy, budget) then runs its own decode. One row per (sample, mode, policy, budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import polars as pl

from kvsim.errors import KvsimError
from kvsim.live.runner import LiveSample
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.policies.scorers.kvzip import RECONSTRUCTION
from kvsim.sim.simulate import LAYER_SCHEMA, policy_layer_count, simulate_sample, summarize
from kvsim.traces.models import LoadedModel
from kvsim.traces.store import TraceSample, TraceSet

# kv_bytes has one column: the simulator predicts exactly what the live cache holds (tested), so a
# second column would only invite comparing two names for one number.
SIM_COLUMNS = {"sim_score": "sim_score", "attn_recall": "sim_attn_recall", "out_err": "sim_out_err"}


def check_model_matches(loaded: LoadedModel, traceset: TraceSet) -> None:
    expected = traceset.meta["model"]
    if loaded.config_hash != expected["config_hash"]:
        raise KvsimError(
            f"the traces were captured from {expected['id']} (config {expected['config_hash']}) but the model given is "
            f"{loaded.source.name} (config {loaded.config_hash}): validate with the model that captured them"
        )


def select_samples(traceset: TraceSet, mode: str | None, count: int | None, sample_ids: Sequence[str] | None = None) -> list[TraceSample]:
    samples = [s for s in traceset.samples(mode) if sample_ids is None or s.sample_id in sample_ids]
    if not samples:
        raise KvsimError("no trace samples match the mode and sample ids asked for: check --mode against `kvsim traces info`")
    return samples[:count] if count else samples


def validate(
    loaded: LoadedModel,
    traceset: TraceSet,
    pairs: Sequence[tuple[Policy, Budget]],
    samples: Sequence[TraceSample],
    on_run: Callable[[], None] = lambda: None,
    on_sample: Callable[[pl.DataFrame], None] = lambda table: None,
) -> pl.DataFrame:
    """Every (policy, budget) pair live on every sample; policy names label the rows, so make them distinct.

    `on_sample` gets the table so far after each sample, so a long run can be saved as it goes.
    """
    check_model_matches(loaded, traceset)
    for policy, _ in pairs:
        policy.check_traces(policy_layer_count(traceset), traceset.meta["window"], traceset.statistics)
    window = max(max(policy.observation_window for policy, _ in pairs), 1)
    kvzip = any(RECONSTRUCTION in policy.requirements() for policy, _ in pairs)
    rows = []
    for sample in samples:
        predicted = _simulated(traceset, sample, pairs)
        live = LiveSample(loaded, traceset, sample, window, kvzip)
        for policy, budget in pairs:
            outcome = live.run(policy, budget)
            rows.append(
                {
                    "sample_id": sample.sample_id,
                    "mode": sample.mode,
                    "task": sample.task,
                    "policy": policy.name,
                    "budget": budget.label,
                    "full_cache_score": sample.score,
                    **predicted[(policy.name, budget.label)],
                    **asdict(outcome),
                }
            )
            on_run()
        on_sample(pl.DataFrame(rows))
    return pl.DataFrame(rows)


def _simulated(traceset: TraceSet, sample: TraceSample, pairs: Sequence[tuple[Policy, Budget]]) -> dict:
    """The simulator's prediction per (policy name, budget label), one replay batch per budget."""
    by_budget: dict[Budget, list[Policy]] = {}
    for policy, budget in pairs:
        by_budget.setdefault(budget, []).append(policy)
    rows = [row for budget, policies in by_budget.items() for row in simulate_sample(traceset, sample, policies, [budget], oracle=False)]
    summary = summarize(pl.DataFrame(rows, schema=LAYER_SCHEMA), traceset)
    return {
        (row["policy"], row["budget"]): {new: row[old] for old, new in SIM_COLUMNS.items()}
        for row in summary.iter_rows(named=True)
    }


def summarize_validation(table: pl.DataFrame) -> pl.DataFrame:
    """Means per (mode, policy, budget): what the terminal table and the report show."""
    return (
        table.group_by("mode", "budget", "policy", maintain_order=True)
        .agg(
            pl.len().alias("samples"),
            pl.col("sim_score").mean(),
            pl.col("score").mean(),
            pl.col("full_cache_score").mean(),
            pl.col("answer_logprob").mean(),
            pl.col("answer_match").mean(),
            pl.col("kl").mean(),
            pl.col("top1").mean(),
            pl.col("kv_bytes").mean(),
            pl.col("decode_ms_per_token").mean(),
        )
        .sort("mode", "budget", "answer_logprob", descending=[False, False, True])
    )
