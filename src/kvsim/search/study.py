"""The Optuna study of a search: its sampler, its pruner, and what makes a resumed study the same one.

Samplers (`--sampler`):
- `tpe` (default): multivariate TPE grouped by the conditional structure of the space, with the
  constant liar so parallel workers do not all draw the same point; fits 100-1000 trials.
- `cmaes`: separable CMA-ES (diagonal covariance: the variant for one budget per layer) on the
  `allocation` space (see `kvsim.search.space`); single objective.
- `nsga2`: NSGA-II, the classic for the quality / memory Pareto front.
- `gp`: Gaussian-process BO; strongest per trial below ~500 trials, slowest per trial.
- `random`: the baseline every sampler must beat (bench/search_speed.py measures that).

Pruner: for `quality`, the median rule on the growing-subset means (a trial is stopped when its
mean over the first k samples is below the median of earlier trials over the same k samples);
the first 5 trials are never pruned, so there is a median to compare with (kept low: an unpruned
every-step policy costs seconds per sample). Optuna's pruners are single-objective, so `pareto`
studies are not pruned.

A study records the settings its values depend on (traces, mode, objective, budget) in its user
attribute `kvsim`; resuming it with other settings is refused, since the old and new values would
not be comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from kvsim.errors import KvsimError
from kvsim.search.storage import StorageChoice

SAMPLERS = ("tpe", "cmaes", "nsga2", "gp", "random")
DIRECTIONS = {"quality": ["maximize"], "pareto": ["maximize", "minimize"]}
STUDY_ATTR = "kvsim"
PRUNER_STARTUP_TRIALS = 5


def make_sampler(name: str, objective: str, seed: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise KvsimError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    if name == "cmaes" and objective == "pareto":
        raise KvsimError("sampler cmaes optimizes one objective: use --sampler nsga2 or tpe with --objective pareto")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, use_separable_cma=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(objective: str) -> optuna.pruners.BasePruner:
    if objective == "pareto":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)


def open_study(
    storage: StorageChoice,
    name: str,
    settings: dict,
    sampler: optuna.samplers.BaseSampler | None = None,
    enqueue: Sequence[tuple[dict, dict]] = (),
) -> optuna.Study:
    """Create the study `name`, or load it when it exists and was made with the same `settings`.

    `settings` must hold `objective`; the whole dict is what a resumed study must match. `enqueue`:
    (parameters, user attributes) of trials a new study runs first (the presets, so a reported winner is at least the
    best preset on the search samples).
    """
    objective = settings["objective"]
    study = optuna.create_study(
        study_name=name,
        storage=storage.open(),
        sampler=sampler,
        pruner=make_pruner(objective),
        directions=DIRECTIONS[objective],
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != DIRECTIONS[objective]:
        raise KvsimError(f"study {name!r} in {storage.describe()} is not a {objective} study: pass another --study")
    recorded = study.user_attrs.get(STUDY_ATTR)
    if recorded is None:
        study.set_user_attr(STUDY_ATTR, settings)
        for params, user_attrs in enqueue:
            study.enqueue_trial(params, user_attrs=user_attrs)
    elif recorded != settings:
        changed = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
        raise KvsimError(
            f"study {name!r} in {storage.describe()} was run with other {', '.join(changed)} "
            f"({', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}): pass the same settings to resume, or another --study"
        )
    return study
