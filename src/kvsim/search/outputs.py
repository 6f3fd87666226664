"""The files a search leaves in RUNDIR besides the study: the trials table, the winners, the scores
on held-out samples, and `search.json`, the small file later commands read (layout in
`kvsim.search`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna
import polars as pl
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kvsim.paths import write_atomically
from kvsim.policies import PRESETS, Budget, Policy
from kvsim.search.objective import WORKER_ATTR, Evaluator, policy_key
from kvsim.search.space import PRESET_PREFIX
from kvsim.search.run import Prepared, settings_json

SEARCH_JSON = "search.json"
TRIALS_PARQUET = "trials.parquet"
TOP_DIR = "top"
FORMAT_VERSION = 1

TRIALS_SCHEMA = {
    "number": pl.Int64,
    "state": pl.String,
    "sim_score": pl.Float64,
    "kv_mib": pl.Float64,
    "budget": pl.Float64,
    "family": pl.String,
    "pruned_after_samples": pl.Int64,
    "duration_s": pl.Float64,
    "worker": pl.String,
    "retry_of": pl.Int64,
    "infeasible": pl.String,
    "policy": pl.String,
    "params": pl.String,
}


def trials_table(study: optuna.Study) -> pl.DataFrame:
    """One row per trial; `policy` and `params` are JSON strings (a policy spec; Optuna's params)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        values = trial.values or []
        last_step = trial.last_step if trial.state == TrialState.PRUNED else None
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "sim_score": values[0] if values else trial.intermediate_values.get(last_step),
            "kv_mib": attrs.get("kv_mib"),
            "budget": attrs.get("budget"),
            "family": trial.params.get("family", "composed"),
            "pruned_after_samples": last_step,
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
            "worker": attrs.get(WORKER_ATTR),
            "retry_of": RetryHeartbeatStaleTrialCallback.retried_trial_number(trial),
            "infeasible": attrs.get("infeasible"),
            "policy": json.dumps(attrs["policy"]) if "policy" in attrs else None,
            "params": json.dumps(trial.params),
        })
    return pl.DataFrame(rows, schema=TRIALS_SCHEMA)


def top_trials(study: optuna.Study, objective: str, k: int) -> list[FrozenTrial]:
    """The k best distinct policies: by sim_score, or the Pareto front's k highest-quality points."""
    candidates = study.best_trials if objective == "pareto" else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(candidates, key=lambda trial: (-trial.values[0], trial.number))
    chosen, seen = [], set()
    for trial in ranked:
        key = (policy_key(trial_policy(trial)), trial.user_attrs["budget"])
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:k]


def trial_policy(trial: FrozenTrial, name: str | None = None) -> Policy:
    spec = dict(trial.user_attrs["policy"])
    if name is not None:
        spec["name"] = name
    return Policy.from_spec(spec)


def trial_budget(trial: FrozenTrial) -> Budget:
    return Budget(trial.user_attrs["budget"])


@dataclass(frozen=True)
class Scored:
    """One policy at one budget: its mean scores on the search and held-out samples."""

    policy: Policy
    budget: Budget
    search: float | None
    held_out: float | None
    kv_mib: float | None  # mean KV MiB per sample, on the held-out samples when there are any
    trial: int | None = None  # None for presets


def score_winners_and_presets(prepared: Prepared, study: optuna.Study, evaluator: Evaluator, winners: list[FrozenTrial]) -> list[Scored]:
    """The winners, then every preset at the best winner's budget, scored on the held-out samples.

    Search scores come from the study (a preset has one when a trial drew it at that budget and
    saw every search sample); presets are not re-run on the search samples, which would cost as
    much as dozens of trials.
    """
    split, name = prepared.split, prepared.settings.study

    def entry(policy: Policy, budget: Budget, trial: FrozenTrial | None, number: int | None = None) -> Scored:
        held_out = evaluator.mean(policy, budget, split.held_out) if split.held_out else None
        kv_mib = held_out.kv_bytes / 2**20 if held_out else trial.user_attrs["kv_mib"] if trial else None
        search = trial.values[0] if trial else None
        return Scored(policy, budget, search, held_out.sim_score if held_out else None, kv_mib, number)

    scored = [
        entry(trial_policy(trial, f"{name}-top{rank}"), trial_budget(trial), trial, trial.number)
        for rank, trial in enumerate(winners, 1)
    ]
    if winners:
        budget = trial_budget(winners[0])
        searched = _preset_trials(study, budget)
        scored += [entry(policy, budget, searched.get(policy.name)) for policy in PRESETS.values()]
    return scored


def _preset_trials(study: optuna.Study, budget: Budget) -> dict[str, FrozenTrial]:
    """Completed trials that evaluated a preset at `budget`, by preset name."""
    found = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        family = trial.params.get("family", "")
        if family.startswith(PRESET_PREFIX) and trial.user_attrs.get("budget") == budget.value:
            found[family.removeprefix(PRESET_PREFIX)] = trial
    return found


def write_outputs(prepared: Prepared, study: optuna.Study, scored: list[Scored], report: Path | None) -> dict:
    """trials.parquet, top/<rank>.json and search.json; returns what search.json holds."""
    rundir = Path(prepared.settings.rundir)
    write_atomically(rundir / TRIALS_PARQUET, trials_table(study).write_parquet)
    (rundir / TOP_DIR).mkdir(exist_ok=True)
    top = []
    for rank, entry in enumerate((s for s in scored if s.trial is not None), 1):
        spec_path = rundir / TOP_DIR / f"{rank}.json"
        spec = {
            "policy": entry.policy.to_spec(),
            "budget": entry.budget.value,
            "provenance": {"study": prepared.settings.study, "trial": entry.trial, "traces": prepared.study_settings["traces"]},
            "sim_score": {"search": entry.search, "held_out": entry.held_out},
            "kv_mib": entry.kv_mib,
        }
        write_atomically(spec_path, lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))
        top.append({"rank": rank, "spec": f"{TOP_DIR}/{rank}.json", **{k: v for k, v in spec.items() if k != "policy"}})
    summary = search_json(prepared, study) | {"top": top, "report": report.name if report else None}
    write_search_json(rundir, summary)
    return summary


def search_json(prepared: Prepared, study: optuna.Study | None = None) -> dict:
    settings = settings_json(prepared.settings) | {"storage": prepared.storage.describe()}
    counts = {}
    if study is not None:
        for state in TrialState:
            count = len(study.get_trials(deepcopy=False, states=(state,)))
            if count:
                counts[state.name.lower()] = count
    return {
        "format_version": FORMAT_VERSION,
        "study": prepared.settings.study,
        "storage": prepared.storage.describe(),
        "traces": settings["traces"],
        "traces_fingerprint": prepared.study_settings["traces"],
        "mode": prepared.settings.mode,
        "objective": prepared.settings.objective,
        "budget": prepared.settings.budget_value(),
        "samples": {"search": list(prepared.split.search), "held_out": list(prepared.split.held_out)},
        "trials": counts,
        "settings": settings,
    }


def write_search_json(rundir: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(rundir / SEARCH_JSON, lambda tmp: tmp.write_text(text))
