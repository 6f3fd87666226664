"""`search(settings)`: trials, the re-ranking on validation samples, then the files in the run folder."""

from __future__ import annotations

from collections.abc import Callable

from kvsim.search.objective import Evaluator
from kvsim.search.outputs import score_on_validation, summary_of, write_outputs
from kvsim.search.report import write_report
from kvsim.search.rundir import SearchRun
from kvsim.search.run import SearchSettings, one_torch_thread, prepare, run_trials
from kvsim.traces.models import LoadedModel, load_model


def search(
    settings: SearchSettings, on_progress: Callable[[int], None] = lambda done: None, loaded: LoadedModel | None = None
) -> SearchRun:
    """Run the study, re-rank its best trials on the validation samples, and write the run folder.

    `on_progress(n)` is called with 0 once the inputs are checked (before any trial), then as
    trials finish, with how many finished since the last call. `loaded`: the model for the exact
    tier, when the caller has it in memory (default: loaded from the traces' model id; spawned
    workers always load their own).
    """
    prepared = prepare(settings)
    run = prepared.run
    # Written before the first trial, so the split is on record even if the run is interrupted.
    run.write_summary(summary_of(prepared) | {"top": []})
    if prepared.settings.tier == "exact" and loaded is None:
        loaded = load_model(prepared.traceset.meta["model"]["id"])
    on_progress(0)
    study = run_trials(prepared, on_progress, loaded)
    proxy = Evaluator(prepared.traceset, prepared.settings.mode)
    with one_torch_thread():
        winners, presets = score_on_validation(prepared, study, proxy, prepared.exact_evaluator(loaded))
        write_outputs(prepared, study, winners, presets, proxy)
    write_report(run)
    return run
