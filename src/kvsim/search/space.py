"""The search space: which policy a trial evaluates, sampled from an Optuna trial.

A study enqueues every preset first (`preset_trials`: `family` fixed to a preset, as published:
the baselines search must beat); every trial the sampler draws is `composed`, a free composition of
one scorer, allocator, schedule and retention from the registry, so a strong preset cannot absorb
the study. Each chosen part samples its own parameters with its `suggest` (declared beside its
fields), under the prefix `<kind>.<name>.`, so parts never share a parameter name and Optuna sees
a clean conditional space. The parts are read from the registry, so a newly registered part joins
the composed family by itself: among them the `knots` allocator (a four-knot depth profile and a
head-competition strength, a handful of dimensions where `free_vector` has one per layer), the
`mixture` scorer (2-3 normalised components drawn from the registry, nested under
`scorer.mixture.<i>.<name>.`) and `mixed_precision` retention (quantized tokens inside the
budget's bytes, so it competes at equal memory where plain `quantize` cannot). The `free_vector`
allocator samples one weight per layer of the traced model.

Two spaces:
- `full`: the above, for TPE, GP and NSGA-II, which handle categorical and conditional parameters.
- `allocation`: only the per-layer weights of a `free_vector` allocator, under SnapKV's scorer,
  schedule and retention (the strongest prefill-once preset family on the bundled model, and a
  cheap replay). A purely continuous space of one dimension per layer is what CMA-ES is built for;
  it models only parameters present in every trial, so it cannot steer a conditional space.

`full` is not searchable: it ignores the budget, so at a fixed budget it would win every study.
"""

from __future__ import annotations

from dataclasses import replace

from kvsim.policies import PRESETS, REGISTRY, Policy
from kvsim.policies.allocators.all_tokens import AllTokens
from kvsim.policies.allocators.free_vector import FreeVector
from kvsim.policies.parts import Part

SPACES = ("full", "allocation")
COMPOSED = "composed"
PRESET_PREFIX = "preset:"
FAMILIES = [PRESET_PREFIX + name for name in PRESETS if name != "full"] + [COMPOSED]
ALLOCATION_BASE = PRESETS["snapkv"]
ALLOCATORS = sorted(name for name, cls in REGISTRY["allocator"].items() if cls is not AllTokens)


def preset_trials() -> list[dict]:
    """Parameters that make a trial evaluate each preset, for `study.enqueue_trial`."""
    return [{"family": family} for family in FAMILIES if family != COMPOSED]


def enqueued_params(trial) -> dict:
    """The parameters `study.enqueue_trial` fixed for this trial ({} for a sampled one)."""
    return trial.study.get_trials(deepcopy=False)[trial.number].system_attrs.get("fixed_params", {})


def suggest_policy(trial, n_layers: int, space: str = "full") -> Policy:
    """The policy of `trial`; composed policies are named `trial-<number>`."""
    if space == "allocation":
        allocator = FreeVector.suggest_for(trial, f"allocator.{FreeVector.name}.", n_layers)
        return replace(ALLOCATION_BASE, name=f"trial-{trial.number}", allocator=allocator)
    # Presets run once each, as enqueued baselines; every sampled trial is a composition, so a
    # sampler that finds a strong preset cannot spend the study redrawing it.
    if "family" in enqueued_params(trial):
        family = trial.suggest_categorical("family", FAMILIES)
        if family != COMPOSED:
            return PRESETS[family.removeprefix(PRESET_PREFIX)]
    allocator = _suggest_part(trial, "allocator", ALLOCATORS, n_layers)
    scorer = _suggest_part(trial, "scorer", sorted(REGISTRY["scorer"]), n_layers)
    schedule = _suggest_part(trial, "schedule", sorted(REGISTRY["schedule"]), n_layers)
    retention = _suggest_part(trial, "retention", sorted(REGISTRY["retention"]), n_layers)
    return Policy(f"trial-{trial.number}", scorer, allocator, schedule, retention)


def _suggest_part(trial, kind: str, names: list[str], n_layers: int) -> Part:
    name = trial.suggest_categorical(kind, names)
    cls = REGISTRY[kind][name]
    prefix = f"{kind}.{name}."
    if cls is FreeVector:
        return FreeVector.suggest_for(trial, prefix, n_layers)
    return cls.suggest(trial, prefix)
