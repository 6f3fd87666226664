"""What a search leaves in its run folder besides the study: the trials table, the winners re-ranked
on the validation samples, the presets scored beside them, and `search.json` (layout in
`kvsim.search`). Everything the report shows is computed here and recorded, so the report can be
rendered again from the folder alone (after `kvsim validate --run` adds the live test table).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import optuna
import polars as pl
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kvsim.policies import PRESETS, Budget, Policy
from kvsim.policies.compress import allocate
from kvsim.search.neighbours import NEIGHBOURS_ATTR
from kvsim.search.objective import DUPLICATE_ATTR, WORKER_ATTR, Evaluator, scorer_family
from kvsim.search.run import Prepared, settings_json
from kvsim.search.space import PRESET_ATTR, space_presets
from kvsim.sim.exact import ExactEvaluator, ExactResult

# The best trials re-ranked on the validation samples (at least --top of them).
RERANK = 5
# Presets whose allocators differ, so the per-layer plot shows every allocation shape once.
ALLOCATION_PRESETS = ("snapkv", "pyramidkv", "adakv", "cake", "prefixkv", "d2o", "razor")
MAX_IMPORTANCES = 15

TRIALS_SCHEMA = {
    "number": pl.Int64,
    "state": pl.String,
    "value": pl.Float64,
    "tier": pl.String,
    "sim_score": pl.Float64,
    "answer_logprob": pl.Float64,
    "kl": pl.Float64,
    "top1": pl.Float64,
    "kv_mib": pl.Float64,
    "budget": pl.Float64,
    "preset": pl.String,
    "neighbour_of": pl.Int64,
    "duplicate_of": pl.Int64,
    "scorer": pl.String,
    "pruned_after_samples": pl.Int64,
    "duration_s": pl.Float64,
    "worker": pl.String,
    "retry_of": pl.Int64,
    "infeasible": pl.String,
    "policy": pl.String,
    "params": pl.String,
}


def trials_table(study: optuna.Study) -> pl.DataFrame:
    """One row per trial. `value` is what the study optimized (answer log-likelihood on the exact
    tier, sim_score on the proxy); `sim_score` is the proxy's mean, for a pruned trial over the
    samples seen; `policy` and `params` are JSON strings."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        last_step = trial.last_step if trial.state == TrialState.PRUNED else None
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.values[0] if trial.values else None,
            "tier": attrs.get("tier", "proxy" if "sim_score" in attrs else None),
            "sim_score": attrs.get("sim_score", trial.intermediate_values.get(last_step)),
            "answer_logprob": attrs.get("answer_logprob"),
            "kl": attrs.get("kl"),
            "top1": attrs.get("top1"),
            "kv_mib": attrs.get("kv_mib"),
            "budget": attrs.get("budget"),
            "preset": attrs.get(PRESET_ATTR),
            "neighbour_of": attrs.get(NEIGHBOURS_ATTR),
            "duplicate_of": attrs.get(DUPLICATE_ATTR),
            "scorer": scorer_family(trial),
            "pruned_after_samples": last_step,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
            "worker": attrs.get(WORKER_ATTR),
            "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(trial),
            "infeasible": attrs.get("infeasible"),
            "policy": json.dumps(attrs["policy"]) if "policy" in attrs else None,
            "params": json.dumps(trial.params),
        })
    return pl.DataFrame(rows, schema=TRIALS_SCHEMA)


def best_trials(study: optuna.Study, objective: str, k: int) -> list[FrozenTrial]:
    """The k best distinct policies on the search samples: by value (KL breaking ties on the exact
    tier), or the Pareto front's k highest-quality points."""
    candidates = study.best_trials if objective == "pareto" else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(candidates, key=lambda trial: (-trial.values[0], trial.user_attrs.get("kl", 0.0), trial.number))
    chosen, seen = [], set()
    for trial in ranked:
        key = (trial_policy(trial).decision_key(), trial.user_attrs["budget"])
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:k]


def trial_policy(trial: FrozenTrial, name: str | None = None) -> Policy:
    spec = dict(trial.user_attrs["policy"])
    if name is not None:
        spec["name"] = name
    return Policy.from_spec(spec)


@dataclass(frozen=True)
class Scored:
    """One policy at one budget, scored on the validation samples (the search's own split)."""

    name: str
    policy: dict  # the spec
    budget: float | int
    trial: int | None  # None for presets
    search_value: float | None  # the study's value on the search samples (None: a preset no trial drew)
    validation: dict  # answer_logprob, answer_match, kl, top1 (exact tier) and sim_score, kv_mib


def score_on_validation(
    prepared: Prepared, study: optuna.Study, proxy: Evaluator, exact: ExactEvaluator | None
) -> tuple[list[Scored], list[Scored]]:
    """(winners best first, presets): the best trials re-ranked on the validation samples, and every
    preset at the winners' budget scored the same way. Without validation samples the search
    samples stand in, and the summary says so."""
    settings, split = prepared.settings, prepared.split
    samples = split.validation or split.search
    candidates = best_trials(study, settings.objective, max(settings.top, RERANK))

    names = ["sim_score", "kv_mib", *(f.name for f in fields(ExactResult) if exact is not None)]

    def scored(name: str, policy: Policy, budget: Budget, trial: FrozenTrial | None) -> Scored:
        if not split.validation and trial is not None and trial.state == TrialState.COMPLETE:
            # A complete trial was scored on every search sample, the ones standing in here: the same numbers.
            metrics = {metric: trial.user_attrs[metric] for metric in names}
        else:
            proxy_result = proxy.mean(policy, budget, samples)
            metrics = {"sim_score": proxy_result.sim_score, "kv_mib": proxy_result.kv_bytes / 2**20}
            if exact is not None:
                metrics |= asdict(exact.mean(policy, budget, samples))
        value = trial.values[0] if trial is not None else None
        return Scored(name, policy.to_spec(), budget.value, None if trial is None else trial.number, value, metrics)

    # A preset keeps its name (a winner that is a preset verbatim says so); compositions are `trial-<n>`.
    winners = [scored(trial_policy(t).name, trial_policy(t), Budget(t.user_attrs["budget"]), t) for t in candidates]
    key = (lambda s: (-s.validation["answer_logprob"], s.validation["kl"])) if exact else (lambda s: -s.validation["sim_score"])
    winners = sorted(winners, key=key)[: settings.top]
    presets = []
    if winners:
        budget = Budget(winners[0].budget)
        drawn = _preset_trials(study, budget)
        statistics = prepared.traceset.statistics  # presets reading statistics the traces lack (kvzip) cannot run
        shown = {"full": PRESETS["full"], **space_presets(settings.space)}  # the full cache: the ceiling
        presets = [scored(name, policy, budget, drawn.get(name)) for name, policy in shown.items() if policy.requirements() <= statistics]
    return winners, presets


def _preset_trials(study: optuna.Study, budget: Budget) -> dict[str, FrozenTrial]:
    """Completed trials that evaluated a preset at `budget`, by preset name."""
    found = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        preset = trial.user_attrs.get(PRESET_ATTR)
        if preset is not None and trial.user_attrs.get("budget") == budget.value:
            found[preset] = trial
    return found


def importances(study: optuna.Study, objective: str, scorer: str | None = None) -> dict[str, float] | str:
    """Optuna's parameter importances, over all trials or within one scorer family (where the
    scorer itself is constant, so the allocator, schedule and parameters that matter around the
    winner's scorer show); a string says why there are none."""
    target = (lambda trial: trial.values[0]) if objective == "pareto" else None
    params = None
    if scorer is not None:
        trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if scorer_family(t) == scorer]
        params = sorted({name for t in trials for name in t.params} - {"scorer"})
        if not params:
            return f"not available: the scorer {scorer} family has no parameters of its own"
        study = optuna.create_study(directions=study.directions)
        study.add_trials(trials)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "importances will be equal" on flat studies: the plot shows it
            found = optuna.importance.get_param_importances(study, target=target, params=params)
    except (ValueError, RuntimeError) as err:  # too few trials, or a space with one point
        return f"not available: {err}"
    if not found:
        return "not available: no completed trial with parameters"
    return dict(list(found.items())[:MAX_IMPORTANCES])


def layer_budgets(proxy: Evaluator, sample_id: str, entries: Sequence[Scored]) -> dict[str, list[float]]:
    """Each layer's budget relative to a uniform split, on one sample: the winner and the presets
    whose allocators differ."""
    prepared = proxy.prepared(sample_id)
    shown = [entries[0]] + [e for e in entries[1:] if e.name in ALLOCATION_PRESETS and e.name != entries[0].name]
    curves = {}
    for entry in shown:
        _, budgets = allocate(Policy.from_spec(entry.policy), prepared.views, Budget(entry.budget), prepared.sample.prompt_len)
        per_layer = budgets.double().mean(dim=1)
        curves[entry.name] = (per_layer / per_layer.mean()).tolist()
    return curves


def write_outputs(prepared: Prepared, study: optuna.Study, winners: list[Scored], presets: list[Scored], proxy: Evaluator) -> dict:
    """trials.parquet, top/<rank>.json and search.json; returns what search.json holds."""
    run = prepared.run
    run.write_trials(trials_table(study))
    top = []
    for rank, entry in enumerate(winners, 1):
        spec = {"policy": entry.policy, "budget": entry.budget, **_provenance(prepared, entry)}
        top.append({"rank": rank, "spec": run.write_top_spec(rank, spec), **{k: v for k, v in spec.items() if k != "policy"}})
    family = scorer_family(study.trials[winners[0].trial]) if winners and winners[0].trial is not None else None
    summary = summary_of(prepared, study) | {
        "top": top,
        "presets": [asdict(entry) for entry in presets],
        "presets_without_statistics": _presets_without_statistics(prepared),
        "importances": {"all": importances(study, prepared.settings.objective)},
    }
    if family is not None:
        summary["importances"]["winner_family"] = {"family": family, "values": importances(study, prepared.settings.objective, family)}
    if winners:
        samples = prepared.split.validation or prepared.split.search
        summary["layer_budgets"] = {"sample_id": samples[0], "curves": layer_budgets(proxy, samples[0], winners[:1] + presets)}
    run.write_summary(summary)
    return summary


def _presets_without_statistics(prepared: Prepared) -> dict[str, list[str]]:
    """Presets (and the scorers behind them) a study could not run, by the statistics the traces
    lack; the allocation space runs no presets."""
    if prepared.settings.space == "allocation":
        return {}
    lacking = {name: policy.requirements() - prepared.traceset.statistics for name, policy in space_presets(prepared.settings.space).items()}
    return {name: sorted(missing) for name, missing in lacking.items() if missing}


def _provenance(prepared: Prepared, entry: Scored) -> dict:
    return {
        "name": entry.name,
        "provenance": {"study": prepared.settings.study, "trial": entry.trial, "traces": prepared.study_settings["traces"]},
        "search_value": entry.search_value,
        "validation": entry.validation,
    }


def summary_of(prepared: Prepared, study: optuna.Study | None = None) -> dict:
    settings = settings_json(prepared.settings) | {"storage": prepared.storage.describe()}
    counts = {}
    if study is not None:
        for state in TrialState:
            count = len(study.get_trials(deepcopy=False, states=(state,)))
            if count:
                counts[state.name.lower()] = count
    split = prepared.split
    return {
        "study": prepared.settings.study,
        "storage": prepared.storage.describe(),
        "traces": settings["traces"],
        "traces_fingerprint": prepared.study_settings["traces"],
        "mode": prepared.settings.mode,
        "objective": prepared.settings.objective,
        "tier": prepared.settings.tier,
        "budget": prepared.settings.budget_value(),
        "samples": {"search": list(split.search), "validation": list(split.validation), "test": list(split.test)},
        "trials": counts,
        "settings": settings,
    }
