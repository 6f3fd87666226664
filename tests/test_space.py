"""The search space: composed policies draw the new parts (knots, mixture, mixed_precision) with a
clean conditional space, every drawn policy round-trips and meets the budget exactly, and every
composition except plain quantize holds at most the bytes dropping holds."""

from __future__ import annotations

import warnings

import optuna
import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, Policy
from kvsim.policies.compress import allocate
from kvsim.policies.parts import KINDS
from kvsim.policies.scorers.mixture import rank_normalized, z_normalized
from kvsim.policies.allocators.free_vector import FreeVector
from kvsim.policies.allocators.knots import Knots
from kvsim.policies.retention import MixedPrecision
from kvsim.policies.schedules import PrefillOnce
from kvsim.policies.scorers.key_diff import KeyDiff
from kvsim.policies.scorers.mixture import Mixture
from kvsim.policies.scorers.window_attention import WindowAttention
from kvsim.search.space import PRESET_ATTR, policy_params, preset_trials, suggest_policy
from kvsim.sim.simulate import prepare_sample, sim_score
from kvsim.traces.synthetic import synthetic_traceset

BUDGET = Budget(0.25)
NEW_PARTS = {"allocator": "knots", "scorer": "mixture", "retention": "mixed_precision"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    traceset = synthetic_traceset(tmp_path_factory.mktemp("space"), n_layers=3, prompt_len=96, continuation=4, window=64)
    return prepare_sample(traceset, next(iter(traceset)))


def run_study(prepared, fixed: dict, trials: int) -> tuple[optuna.Study, list[tuple[Policy, int]]]:
    """A seeded TPE study over the composed family, checking every drawn policy as it goes;
    returns the study and each evaluated (policy, low-precision tokens held)."""
    reference_bytes = sum(outcome.kv_bytes for outcome in prepared.replay(PRESETS["snapkv"], BUDGET))
    n_layers, kv_heads = len(prepared.views), prepared.views[0].kv_heads
    per_head = BUDGET.per_head(prepared.sample.prompt_len)
    evaluated = []

    def objective(trial):
        policy = suggest_policy(trial, n_layers)
        assert Policy.from_spec(policy.to_spec()) == policy
        chosen = {kind: trial.params[kind] for kind in KINDS}
        for name in trial.params:  # each parameter sits under the part that declared it
            assert name in KINDS or any(name.startswith(f"{kind}.{part}.") for kind, part in chosen.items()), name
        try:
            _, budgets = allocate(policy, prepared.views, BUDGET, prepared.sample.prompt_len)
            outcomes = prepared.replay(policy, BUDGET)
        except KvsimError as error:  # as the search's objective does: an infeasible composition is pruned
            raise optuna.TrialPruned(str(error)) from error
        assert int(budgets.sum()) == n_layers * kv_heads * per_head
        held = sum(outcome.kv_bytes for outcome in outcomes)
        if policy.retention.name != "quantize":  # plain quantize alone holds its evicted tokens on top
            assert held <= reference_bytes, (policy.to_spec(), held, reference_bytes)
        evaluated.append((policy, sum(outcome.low_precision_tokens for outcome in outcomes)))
        return sim_score(outcomes)

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.PartialFixedSampler(fixed, optuna.samplers.TPESampler(seed=0))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials)
    return study, evaluated


def test_a_tpe_study_over_composed_policies_draws_every_kind_of_part(prepared):
    study, evaluated = run_study(prepared, {}, 60)
    assert len(evaluated) >= 45  # pruned only for windows the traces lack
    drawn = {kind: {getattr(policy, kind).name for policy, _ in evaluated} for kind in KINDS}
    assert len(drawn["scorer"]) >= 6 and len(drawn["allocator"]) >= 5 and len(drawn["retention"]) >= 3, drawn


def test_the_new_parts_search_their_own_parameters(prepared):
    study, evaluated = run_study(prepared, NEW_PARTS, 25)
    params = {name for trial in study.trials for name in trial.params}
    assert {f"allocator.knots.knot{k}" for k in range(4)} <= params
    assert {"allocator.knots.head_strength", "retention.mixed_precision.full_share", "retention.mixed_precision.nbits"} <= params
    assert {"scorer.mixture.components", "scorer.mixture.0.scorer", "scorer.mixture.0.weight", "scorer.mixture.normalize"} <= params
    components = {scorer.name for policy, _ in evaluated for scorer in policy.scorer.scorers}
    assert "mixture" not in components and "random" not in components and len(components) >= 4, components
    # Mixed precision really holds low-precision tokens (and, checked above, no more bytes than dropping).
    assert all(low > 0 for _, low in evaluated)


def test_rank_and_z_normalisation_are_over_the_tokens_a_head_holds():
    scores = torch.tensor([[3.0, 1.0, 9.0, 5.0, 5.0]])
    held = torch.tensor([[True, True, False, True, True]])
    ranks = rank_normalized(scores, held)
    # Held: 5, 5 (the earlier first), 3, 1 -> 1, 2/3, 1/3, 0; the unheld 9 ranks below them all.
    torch.testing.assert_close(ranks[0, [3, 4, 0, 1]], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    assert ranks[0, 2] < 0
    z = z_normalized(scores, held)
    held_scores = torch.tensor([3.0, 1.0, 5.0, 5.0])
    torch.testing.assert_close(z[0, [0, 1, 3, 4]], (held_scores - held_scores.mean()) / held_scores.std(unbiased=False))
    assert torch.equal(z_normalized(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool)), torch.zeros(1, 4))


def test_every_preset_is_a_point_of_the_search_space():
    """Presets are enqueued as parameters of the composed space, so the sampler learns from them:
    each must be rebuilt exactly by `suggest_policy`, under its own name."""
    names = []
    for params, user_attrs in preset_trials():
        name = user_attrs[PRESET_ATTR]
        rebuilt = suggest_policy(optuna.trial.FixedTrial(params), n_layers=30)
        assert rebuilt.decision_key() == PRESETS[name].decision_key(), name
        names.append(name)
    assert names == [name for name in PRESETS if name != "full"]
    study = optuna.create_study(direction="maximize")
    params, user_attrs = preset_trials()[names.index("snapkv")]
    study.enqueue_trial(params, user_attrs={PRESET_ATTR: "snapkv"})
    assert suggest_policy(study.ask(), n_layers=30) is PRESETS["snapkv"]
    study.enqueue_trial(params, user_attrs={PRESET_ATTR: "pyramidkv"})  # parameters that are not the named preset
    with pytest.raises(KvsimError, match="cannot express preset 'pyramidkv'"):
        suggest_policy(study.ask(), n_layers=30)


def test_the_prefill_space_holds_only_policies_that_decide_once(prepared):
    enqueued = [user_attrs[PRESET_ATTR] for _, user_attrs in preset_trials("prefill")]
    assert "snapkv" in enqueued and "keydiff" in enqueued
    assert not {"tova", "h2o", "streaming_llm", "lazy", "cake", "d2o"} & set(enqueued)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        assert suggest_policy(study.ask(), n_layers=3, space="prefill").schedule.name == "prefill"


def test_parts_that_name_their_trial_parameters_apart_from_their_fields_round_trip():
    """`trial_params` is the inverse of `suggest` where the names differ from the fields: knots,
    per-layer weights, nested mixtures, chunk lengths and per-depth bit widths."""
    policies = [
        Policy(
            "composed",
            Mixture(scorers=(WindowAttention(window=16, pool="chunk", kernel=10), KeyDiff()), weights=(0.3, 0.9), normalize="z"),
            Knots(knots=(0.5, 2.0, 1.0, 4.0), head_strength=0.25),
            PrefillOnce(sinks=4, recent=16),
            MixedPrecision(full_share=0.4, key_bits=(8, 2), value_bits=(4, 2)),
        ),
        Policy("vector", KeyDiff(), FreeVector(weights=(1.0, 0.5, 2.0)), PrefillOnce(), MixedPrecision(nbits=3, full_share=0.6)),
    ]
    for policy in policies:
        rebuilt = suggest_policy(optuna.trial.FixedTrial(policy_params(policy)), n_layers=3)
        assert rebuilt.decision_key() == policy.decision_key(), policy.name
