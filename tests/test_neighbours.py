"""The local search step: one-part moves around the best preset, and redrawn policies costing nothing."""

from __future__ import annotations

import optuna
import polars as pl
import pytest
from optuna.trial import FixedTrial

from kvsim.policies import PRESETS, Budget
from kvsim.policies.parts import KINDS
from kvsim.policies.retention import MixedPrecision
from kvsim.search import SearchSettings, search
from kvsim.search.neighbours import NEIGHBOURS_ATTR, neighbour_params
from kvsim.search.objective import DUPLICATE_ATTR, Evaluator, Objective
from kvsim.search.space import PRESET_ATTR, policy_params, space_presets, suggest_policy
from kvsim.traces.store import TraceSet
from kvsim.traces.synthetic import synthetic_traceset

N_LAYERS = 30


def changed_parts(a, b) -> list[str]:
    return [kind for kind in KINDS if getattr(a, kind) != getattr(b, kind)]


@pytest.mark.parametrize("best", sorted(set(space_presets("prefill")) - {"random"}))
def test_every_prefill_presets_neighbours_change_one_part_and_rebuild_from_their_parameters(best):
    runner_up = PRESETS["keydiff" if best != "keydiff" else "kvzip"]
    params = neighbour_params(PRESETS[best], runner_up, "prefill", N_LAYERS)
    policies = [suggest_policy(FixedTrial(p), N_LAYERS, "prefill") for p in params]
    assert len(policies) >= 8
    assert len({p.decision_key() for p in policies} | {PRESETS[best].decision_key()}) == len(policies) + 1
    for policy in policies:
        assert len(changed_parts(policy, PRESETS[best])) == 1, policy
    kivi = [p.retention for p in policies if isinstance(p.retention, MixedPrecision) and p.retention.key_group == 32]
    assert kivi and all(r.nbits == 2 for r in kivi)
    assert any(p.scorer.name == "mixture" for p in policies)


def test_once_the_presets_ran_the_best_ones_neighbours_are_enqueued_and_run(tmp_path):
    traces = synthetic_traceset(tmp_path / "traces", prompt_len=128, window=32).root
    presets = len(space_presets("prefill"))
    run = search(SearchSettings(traces=traces, budget=Budget(0.25), rundir=tmp_path / "run", trials=presets + 6, prefill_only=True,
                                validation=0.0, test=0.0, tier="proxy"))
    study = optuna.load_study(study_name="kvsim", storage=f"sqlite:///{run.rundir / 'study.db'}")
    trials = study.get_trials()
    preset_numbers = [t.number for t in trials if PRESET_ATTR in t.user_attrs]
    best = max((t for t in trials if t.number in preset_numbers and t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert study.user_attrs[NEIGHBOURS_ATTR] == best.number
    moved = [t for t in trials if NEIGHBOURS_ATTR in t.user_attrs]
    ran = [t for t in moved if t.state.is_finished()]
    assert len(moved) >= 8 and len(ran) == 6  # the trials after the presets were neighbours; the rest wait for a resumed run
    assert min(t.number for t in moved) > max(preset_numbers)
    table = pl.read_parquet(run.rundir / "trials.parquet")
    assert table.filter(pl.col("neighbour_of").is_not_null())["number"].to_list() == [t.number for t in moved]
    best_policy = PRESETS[best.user_attrs[PRESET_ATTR]]
    for trial in ran:
        assert trial.user_attrs[NEIGHBOURS_ATTR] == best.number
        policy = suggest_policy(FixedTrial(trial.params), 4, "prefill")
        assert len(changed_parts(policy, best_policy)) == 1


def test_a_redrawn_policy_reuses_its_twins_value_instead_of_running_again(tmp_path):
    traceset = TraceSet.open(synthetic_traceset(tmp_path / "traces", prompt_len=128, window=32).root)
    samples = [s.sample_id for s in traceset.samples("query-aware")]
    calls = []
    evaluator = Evaluator(traceset, "query-aware")
    evaluate = evaluator.evaluate
    evaluator.evaluate = lambda *args: calls.append(args) or evaluate(*args)
    study = optuna.create_study(direction="maximize")
    params = policy_params(PRESETS["snapkv"])
    for _ in range(2):
        study.enqueue_trial(params)
    objective = Objective(evaluator, samples, Budget(0.25))
    study.optimize(objective, n_trials=1)
    evaluated = len(calls)
    study.optimize(objective, n_trials=1)
    first, second = study.trials
    assert evaluated > 0 and len(calls) == evaluated  # the second trial evaluated nothing
    assert second.user_attrs[DUPLICATE_ATTR] == first.number and second.value == first.value
    assert second.user_attrs["sim_score"] == first.user_attrs["sim_score"]
