"""`run_search`: one `kvsim search` run, from the TraceSet to the files in RUNDIR.

The run checks everything a trial would trip on before the first trial (the traces, the mode, the
budget against every sample's prompt, the storage), records the split in `search.json`, then runs
its trials in this process (`--workers 1`) or in K spawned worker processes sharing the study.
`--trials N` adds N trials to the study, split across the workers, so a re-run resumes rather
than starts over, and several runs against one PostgreSQL study each add their own N.

Every worker prepares the search samples it touches once and keeps them (about 50 MB per
1.5K-token sample of the bundled model), and with the exact tier loads the model and prefills each
search sample once, so K workers hold K copies: the price of processes, which Python needs for
CPU-bound trials (threads would share one core under the GIL).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from kvsim.errors import KvsimError
from kvsim.paths import ensure_writable_dir
from kvsim.policies import Budget, resolve_policy
from kvsim.live.validate import check_model_matches
from kvsim.search.objective import DEFAULT_PROMOTE, OBJECTIVES, TIERS, BudgetRange, Evaluator, Objective
from kvsim.search.neighbours import enqueue_neighbours
from kvsim.search.rundir import SearchRun
from kvsim.search.space import DEFAULT_BASE, flat_allocation_trial, preset_trials
from kvsim.search.split import Split, split_samples
from kvsim.search.storage import DEFAULT_HEARTBEAT_S, StorageChoice, choose_storage, retry_orphaned_trials
from kvsim.search.study import make_sampler, open_study
from kvsim.sim.exact import ExactEvaluator
from kvsim.sim.simulate import policy_layer_count
from kvsim.traces.models import LoadedModel, load_model, silence_cache_rename_warning
from kvsim.traces.store import TraceSet, check_mode

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_POLL_S = 1.0


@dataclass(frozen=True)
class SearchSettings:
    traces: Path
    budget: Budget | BudgetRange
    rundir: Path
    study: str = "kvsim"
    trials: int = 100
    objective: str = "quality"
    storage: str | None = None
    workers: int = 1
    sampler: str = "tpe"
    mode: str | None = None  # None: the TraceSet's one mode (refused when it holds both)
    seed: int = 0
    validation: float = 0.25
    test: float = 0.25
    top: int = 3
    tier: str = "exact"
    promote: float = DEFAULT_PROMOTE
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    prefill_only: bool = False  # compositions and presets that decide once at prefill (kvsim.search.space)
    base: str = DEFAULT_BASE  # the allocation space's other parts: a preset name or a .json spec
    time_limit_s: float | None = None  # each worker starts no trial after this many seconds of trials (Optuna's timeout)

    @property
    def space(self) -> str:
        if self.sampler == "cmaes":
            return "allocation"
        return "prefill" if self.prefill_only else "full"

    def budget_value(self) -> float | int | list:
        if isinstance(self.budget, BudgetRange):
            return [self.budget.low.value, self.budget.high.value]
        return self.budget.value


@dataclass
class Prepared:
    """What a run checked once and every worker shares."""

    settings: SearchSettings
    traceset: TraceSet
    split: Split
    storage: StorageChoice
    study_settings: dict  # what a resumed study must match (see kvsim.search.study.open_study)
    run: SearchRun

    def exact_evaluator(self, loaded: LoadedModel | None = None) -> ExactEvaluator | None:
        """The exact tier for this process (None with --tier proxy); loads the model that captured the traces."""
        if self.settings.tier != "exact":
            return None
        loaded = loaded or load_model(self.traceset.meta["model"]["id"])
        check_model_matches(loaded, self.traceset)
        return ExactEvaluator(loaded, self.traceset, self.settings.mode)


def prepare(settings: SearchSettings) -> Prepared:
    """Check the inputs and choose the storage; raises KvsimError with the fix before any trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is shown by the caller, not a log line per trial
    # Heartbeats, their retry callback and `group` are marked experimental; a warning per use buries the progress bar.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if settings.objective not in OBJECTIVES:
        raise KvsimError(f"unknown objective {settings.objective!r}: choose {' or '.join(OBJECTIVES)}")
    if settings.tier not in TIERS:
        raise KvsimError(f"unknown tier {settings.tier!r}: choose {' or '.join(TIERS)}")
    if not 0 <= settings.promote < 1:
        raise KvsimError(f"--promote {settings.promote} is outside [0, 1): give the proxy quantile a trial must reach, e.g. 0.5")
    if settings.trials < 1 or settings.workers < 1 or settings.top < 1:
        raise KvsimError("--trials, --workers and --top must be at least 1")
    if settings.objective == "pareto" and not isinstance(settings.budget, BudgetRange):
        raise KvsimError("--objective pareto explores a budget range: give two budgets, e.g. --budget 0.02,0.2")
    if settings.objective == "quality" and isinstance(settings.budget, BudgetRange):
        raise KvsimError("--objective quality searches at one budget: give one, e.g. --budget 0.05")
    make_sampler(settings.sampler, settings.objective, settings.seed)  # rejects unknown or unfit samplers early
    traceset = TraceSet.open(settings.traces)
    settings = replace(settings, mode=infer_mode(traceset, settings.mode))
    if settings.space == "allocation":
        resolve_policy(settings.base).check_traces(policy_layer_count(traceset), traceset.meta["window"], traceset.statistics)
    traceset.check_files(settings.mode)  # a damaged file is an error here, not a pruned trial
    split = split_samples(traceset.manifest, settings.mode, settings.validation, settings.test, settings.seed)
    highest = settings.budget.high if isinstance(settings.budget, BudgetRange) else settings.budget
    for sample_id in split.search + split.validation + split.test:
        highest.per_head(traceset.sample(sample_id, settings.mode).prompt_len)
    ensure_writable_dir(settings.rundir, "run folder")
    run = SearchRun(Path(settings.rundir))
    storage = choose_storage(settings.storage, run, settings.workers, settings.heartbeat_s)
    study_settings = {
        "traces": traces_fingerprint(traceset),
        "mode": settings.mode,
        "objective": settings.objective,
        "budget": settings.budget_value(),
        "space": settings.space,
        **({"base": resolve_policy(settings.base).decision_key()} if settings.space == "allocation" else {}),
        "split_seed": settings.seed,
        "validation": settings.validation,
        "test": settings.test,
        "tier": settings.tier,
        "promote": settings.promote,
    }
    return Prepared(settings, traceset, split, storage, study_settings, run)


def infer_mode(traceset: TraceSet, mode: str | None) -> str:
    """The mode asked for, or the TraceSet's only one."""
    if mode is not None:
        check_mode(mode)
        return mode
    modes = sorted(set(traceset.manifest["mode"]))
    if len(modes) != 1:
        raise KvsimError(f"the traces hold both evaluation modes ({', '.join(modes)}): pass --mode to choose one")
    return modes[0]


def traces_fingerprint(traceset: TraceSet) -> str:
    """Identifies the traces by content, so workers on other machines may keep them at other paths."""
    digests = sorted(traceset.manifest["sha256"].to_list())
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def run_trials(
    prepared: Prepared, on_progress: Callable[[int], None] = lambda done: None, loaded: LoadedModel | None = None
) -> optuna.Study:
    """Add `trials` trials to the study with `workers` processes; returns the study (reloaded).
    `loaded`: the model for the exact tier in this process (spawned workers load their own)."""
    settings = prepared.settings
    if settings.space == "allocation":
        enqueue = [flat_allocation_trial(policy_layer_count(prepared.traceset))]
    else:
        enqueue = preset_trials(settings.space) if settings.objective == "quality" else []
    study = open_study(prepared.storage, settings.study, prepared.study_settings, enqueue=enqueue)
    if prepared.storage.embedded:
        retry_orphaned_trials(study)
    if settings.workers == 1:
        _optimize(prepared, settings.trials, 0, lambda study: on_progress(1), loaded)
    else:
        _run_workers(prepared, study, on_progress)
    return open_study(prepared.storage, settings.study, prepared.study_settings)


def _run_workers(prepared: Prepared, study: optuna.Study, on_progress: Callable[[int], None]) -> None:
    settings = prepared.settings
    finished_before = len(study.get_trials(deepcopy=False, states=FINISHED))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or DB connections
    workers = []
    for index in range(settings.workers):
        share = settings.trials // settings.workers + (index < settings.trials % settings.workers)
        process = context.Process(target=_worker, args=(settings, share, index), name=f"kvsim-search-{index}")
        process.start()
        workers.append(process)
    reported, running = 0, True
    while running:
        time.sleep(_POLL_S)
        running = any(process.is_alive() for process in workers)
        done = len(study.get_trials(deepcopy=False, states=FINISHED)) - finished_before
        on_progress(done - reported)
        reported = done
    dead = [f"{p.name} (exit code {p.exitcode})" for p in workers if p.exitcode != 0]
    if dead:
        requeued = retry_orphaned_trials(study) if prepared.storage.embedded else []
        raise KvsimError(
            f"worker(s) {', '.join(dead)} stopped early; {len(requeued)} running trial(s) were queued again: "
            "re-run the same command to resume the study"
        )


def _worker(settings: SearchSettings, trials: int, index: int) -> None:
    """Entry point of a spawned worker process."""
    silence_cache_rename_warning()
    parent = os.getppid()

    def stop_when_orphaned(study: optuna.Study) -> None:
        # A killed `kvsim search` takes its workers with it: each finishes its trial, then stops.
        if os.getppid() != parent:
            study.stop()

    _optimize(prepare(settings), trials, index, stop_when_orphaned)


def _optimize(
    prepared: Prepared, trials: int, index: int, after_trial: Callable[[optuna.Study], None], loaded: LoadedModel | None = None
) -> None:
    settings = prepared.settings
    study = open_study(prepared.storage, settings.study, prepared.study_settings)
    # Distinct seeds per worker and per run, or parallel and resumed workers redraw the same points;
    # processes on other machines also differ by pid.
    seed = settings.seed + index + len(study.trials) + (0 if prepared.storage.embedded else os.getpid())
    study.sampler = make_sampler(settings.sampler, settings.objective, seed)
    objective = Objective(
        Evaluator(prepared.traceset, settings.mode), prepared.split.search, settings.budget, settings.objective, settings.space,
        prepared.exact_evaluator(loaded), settings.promote, resolve_policy(settings.base),
    )
    n_layers = policy_layer_count(prepared.traceset)
    local_search = settings.objective == "quality" and settings.space != "allocation"

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if local_search:
            enqueue_neighbours(study, settings.space, n_layers)
        after_trial(study)

    with one_torch_thread():
        study.optimize(objective, n_trials=trials, timeout=settings.time_limit_s, callbacks=[callback], gc_after_trial=False)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Replays are many small per-layer ops, where a second torch thread costs more in
    synchronization than it gains (on a busy CPU, several times more); search runs processes in
    parallel instead. The caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def settings_json(settings: SearchSettings) -> dict:
    data = asdict(replace(settings, budget=None))
    data.update(traces=str(Path(settings.traces).resolve()), rundir=str(Path(settings.rundir).resolve()), budget=settings.budget_value())
    return data
