"""The search space: which policy a trial evaluates, sampled from an Optuna trial.

A trial is a composition of one scorer, allocator, schedule and retention from the registry. A
quality study first enqueues every preset (`preset_trials`), as published, as a point of this same
space: they are the baselines search must beat, and the sampler learns from their values where
the good regions are, so it composes around a strong preset (its scorer with another allocator, a
mixture with it, another window) instead of only drawing it again. Each chosen part samples its own parameters with its `suggest` (declared beside its
fields), under the prefix `<kind>.<name>.`, so parts never share a parameter name and Optuna sees
a clean conditional space. The parts are read from the registry, so a newly registered part joins
the composed family by itself: among them the `knots` allocator (a four-knot depth profile and a
head-competition strength, a handful of dimensions where `free_vector` has one per layer), the
`mixture` scorer (2-3 normalised components drawn from the registry, nested under
`scorer.mixture.<i>.<name>.`) and `mixed_precision` retention (quantized tokens inside the
budget's bytes, so it competes at equal memory where plain `quantize` cannot). The `free_vector`
allocator samples one weight per layer of the traced model.

Three spaces:
- `full`: the above, for TPE, GP and NSGA-II, which handle categorical and conditional parameters.
- `prefill`: the same with the schedule fixed to `prefill` (decide once after the prompt, then
  grow), and only the presets that do so: what most serving engines can run, and about ten times
  cheaper per exact-tier trial, since a prefill-once cache reads the whole continuation in one
  forward where an every-step one needs a forward per token.
- `allocation`: only the per-layer weights of a `free_vector` allocator, under a base policy's
  scorer, schedule and retention (`--base`, SnapKV's by default: a cheap replay; give the best
  preset of a first study to tune its per-layer budgets). A purely continuous space of one
  dimension per layer is what CMA-ES is built for; it models only parameters present in every
  trial, so it cannot steer a conditional space. Its first trial is the flat profile (every
  weight 1: the base's parts with uniform budgets), the baseline the tuned vector must beat.

`full` is not searchable: it ignores the budget, so at a fixed budget it would win every study.
"""

from __future__ import annotations

from dataclasses import replace

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, REGISTRY, Policy
from kvsim.policies.allocators.all_tokens import AllTokens
from kvsim.policies.allocators.free_vector import FreeVector
from kvsim.policies.parts import KINDS, Part
from kvsim.policies.schedules import PrefillOnce

SPACES = ("full", "prefill", "allocation")
# The user attribute naming the preset an enqueued trial evaluates.
PRESET_ATTR = "preset"
DEFAULT_BASE = "snapkv"
ALLOCATORS = sorted(name for name, cls in REGISTRY["allocator"].items() if cls is not AllTokens)


def policy_params(policy: Policy) -> dict:
    """The trial parameters under which `suggest_policy` rebuilds `policy` in the `full` space."""
    params = {}
    for kind in KINDS:
        part = getattr(policy, kind)
        params |= {kind: part.name, **part.trial_params(f"{kind}.{part.name}.")}
    return params


def space_presets(space: str = "full") -> dict[str, Policy]:
    """The presets a study in `space` runs as baselines (`full` ignores the budget: never one)."""
    return {
        name: policy
        for name, policy in PRESETS.items()
        if name != "full" and (space != "prefill" or isinstance(policy.schedule, PrefillOnce))
    }


def preset_trials(space: str = "full") -> list[tuple[dict, dict]]:
    """(parameters, user attributes) of a trial evaluating each preset of `space`, for `study.enqueue_trial`.

    Presets are enqueued as points of the composed space, not as opaque choices: the sampler then
    sees, say, that a KeyDiff scorer scored well and draws its next compositions near it."""
    return [(policy_params(policy), {PRESET_ATTR: name}) for name, policy in space_presets(space).items()]


def flat_allocation_trial(n_layers: int) -> tuple[dict, dict]:
    """The `allocation` space's baseline, for `study.enqueue_trial`: every layer's weight 1."""
    return FreeVector(weights=(1.0,) * n_layers).trial_params(f"allocator.{FreeVector.name}."), {}


def suggest_policy(trial, n_layers: int, space: str = "full", base: Policy | None = None) -> Policy:
    """The policy of `trial`: a preset's name when the trial was enqueued as one, else
    `trial-<number>`. `base`: the parts the `allocation` space keeps (default SnapKV's)."""
    name = f"trial-{trial.number}"
    if space == "allocation":
        allocator = FreeVector.suggest_for(trial, f"allocator.{FreeVector.name}.", n_layers)
        return replace(base or PRESETS[DEFAULT_BASE], name=name, allocator=allocator)
    allocator = _suggest_part(trial, "allocator", ALLOCATORS, n_layers)
    scorer = _suggest_part(trial, "scorer", sorted(REGISTRY["scorer"]), n_layers)
    schedules = [PrefillOnce.name] if space == "prefill" else sorted(REGISTRY["schedule"])
    schedule = _suggest_part(trial, "schedule", schedules, n_layers)
    retention = _suggest_part(trial, "retention", sorted(REGISTRY["retention"]), n_layers)
    policy = Policy(name, scorer, allocator, schedule, retention)
    preset = trial.user_attrs.get(PRESET_ATTR)
    if preset is None:
        return policy
    if policy.decision_key() != PRESETS[preset].decision_key():
        raise KvsimError(f"the search space cannot express preset {preset!r} (its parameters are not all suggested): this is a kvsim bug")
    return PRESETS[preset]


def _suggest_part(trial, kind: str, names: list[str], n_layers: int) -> Part:
    name = trial.suggest_categorical(kind, names)
    cls = REGISTRY[kind][name]
    prefix = f"{kind}.{name}."
    if cls is FreeVector:
        return FreeVector.suggest_for(trial, prefix, n_layers)
    return cls.suggest(trial, prefix)
