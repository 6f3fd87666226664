"""One-part moves around the study's best preset, enqueued once every preset has run.

The composed space is wide (14 scorers × 10 allocators × 4 retentions, each with parameters) and a
study has tens of trials, so TPE alone rarely lands on the obvious improvements of a strong
preset: the same scorer with its bytes spent on more tokens at low precision, another split of the
budget across heads, a few sinks and a recent window, pooled scores, or a mixture with the
runner-up's scorer. Measured on the bundled model (query-aware, budget 0.1, 50 trials), TPE drew
the best preset's scorer again and again with other parts unchanged, and four of its trials were
the same policy. So once the presets are scored, each of these neighbours of the best one is
enqueued as a trial: a local search step (coordinate moves from the incumbent) before the sampler
goes on, whose results the sampler then learns from like any other trial.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import optuna
from optuna.trial import FixedTrial, TrialState

from kvsim.errors import KvsimError
from kvsim.policies import Policy
from kvsim.policies.allocators.global_top import GlobalTop
from kvsim.policies.allocators.head_adaptive import HeadAdaptive
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.allocators.variance_softmax import VarianceSoftmax
from kvsim.policies.retention import MixedPrecision
from kvsim.policies.scorers.mixture import Mixture
from kvsim.policies.scorers.random_scores import RandomScores
from kvsim.search.space import PRESET_ATTR, policy_params, suggest_policy

# The study attribute recording that (and around which trial) the neighbours were enqueued, and the
# trial attribute naming the trial a neighbour moves from.
NEIGHBOURS_ATTR = "neighbours_of"

# (full_share, bits, key_group): half or a quarter of each head's bytes at full precision, the rest
# at 4 bits per token, or at 2 bits with KIVI's per-channel keys.
MIXED_PRECISION_MOVES = ((0.5, 4, 0), (0.25, 4, 0), (0.5, 2, 32), (0.25, 2, 32))
ALLOCATOR_MOVES = (Uniform(), HeadAdaptive(alpha=0.2), GlobalTop(), VarianceSoftmax())
SCHEDULE_MOVES = ((4, 8), (1, 32))  # (sinks, recent)
MIXTURE_WEIGHTS = (0.7, 0.3)


def neighbours(best: Policy, runner_up: Policy | None) -> list[Policy]:
    """`best` with one part changed: its retention, allocator, protected tokens or pooling, or its
    scorer mixed with `runner_up`'s (the best policy with another scorer)."""
    moves = [replace(best, retention=MixedPrecision(nbits=bits, full_share=share, key_group=group)) for share, bits, group in MIXED_PRECISION_MOVES]
    moves += [replace(best, allocator=allocator) for allocator in ALLOCATOR_MOVES]
    moves += [replace(best, schedule=replace(best.schedule, sinks=sinks, recent=recent)) for sinks, recent in SCHEDULE_MOVES]
    if getattr(best.scorer, "pool", None) == "none":
        moves.append(replace(best, scorer=replace(best.scorer, pool="max", kernel=5)))
    mixable = runner_up is not None and not any(isinstance(s, (Mixture, RandomScores)) for s in (best.scorer, runner_up.scorer))
    if mixable and runner_up.scorer.name != best.scorer.name:
        moves.append(replace(best, scorer=Mixture(scorers=(best.scorer, runner_up.scorer), weights=MIXTURE_WEIGHTS, normalize="rank")))
    return moves


def neighbour_params(best: Policy, runner_up: Policy | None, space: str, n_layers: int) -> list[dict]:
    """Trial parameters of `best`'s neighbours that `space` can express, each once, `best` excluded."""
    seen, out = {best.decision_key()}, []
    for policy in neighbours(best, runner_up):
        params = policy_params(policy)
        if policy.decision_key() in seen or not _expressible(params, policy, space, n_layers):
            continue
        seen.add(policy.decision_key())
        out.append(params)
    return out


def _expressible(params: dict, policy: Policy, space: str, n_layers: int) -> bool:
    """Whether `suggest_policy` rebuilds `policy` from `params` in `space`, every value inside the
    distribution it is drawn from (Optuna only warns when an enqueued value is outside it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return suggest_policy(FixedTrial(params), n_layers, space).decision_key() == policy.decision_key()
    except (ValueError, KvsimError, UserWarning):
        return False


def enqueue_neighbours(study: optuna.Study, space: str, n_layers: int) -> None:
    """Once every enqueued preset has finished, enqueue the neighbours of the best complete trial
    (ordinarily a preset). Runs after each trial in every worker; the study attribute makes it
    happen once, and `skip_if_exists` drops the copies two workers racing here would add."""
    if NEIGHBOURS_ATTR in study.user_attrs:
        return
    trials = study.get_trials(deepcopy=False)
    presets = [t for t in trials if PRESET_ATTR in t.user_attrs]
    if not presets or any(not t.state.is_finished() for t in presets):
        return
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE and "policy" in t.user_attrs), key=lambda t: t.value, reverse=True)
    if not ranked:
        return
    study.set_user_attr(NEIGHBOURS_ATTR, ranked[0].number)
    best = Policy.from_spec(ranked[0].user_attrs["policy"])
    runner_up = next((p for p in (Policy.from_spec(t.user_attrs["policy"]) for t in ranked[1:]) if p.scorer.name != best.scorer.name), None)
    for params in neighbour_params(best, runner_up, space, n_layers):
        study.enqueue_trial(params, user_attrs={NEIGHBOURS_ATTR: ranked[0].number}, skip_if_exists=True)
