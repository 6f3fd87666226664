"""`search(settings)`: trials, then the files in RUNDIR; what `kvsim search` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvsim.search.objective import Evaluator
from kvsim.search.outputs import score_winners_and_presets, search_json, top_trials, trials_table, write_outputs, write_search_json
from kvsim.search.report import write_report
from kvsim.search.run import SearchSettings, prepare, run_trials

REPORT = "report.html"


def search(settings: SearchSettings, on_progress: Callable[[int], None] = lambda done: None) -> dict:
    """Run the study and write RUNDIR; returns the content of `search.json`.

    `on_progress(n)` is called with 0 once the inputs are checked (before any trial), then as
    trials finish, with how many finished since the last call.
    """
    prepared = prepare(settings)
    rundir = Path(settings.rundir)
    # Written before the first trial, so the split is on record even if the run is interrupted.
    write_search_json(rundir, search_json(prepared) | {"top": []})
    on_progress(0)
    study = run_trials(prepared, on_progress)
    winners = top_trials(study, settings.objective, settings.top)
    evaluator = Evaluator(prepared.traceset, settings.mode)
    scored = score_winners_and_presets(prepared, study, evaluator, winners)
    summary = write_outputs(prepared, study, scored, rundir / REPORT)
    write_report(rundir / REPORT, summary, study, trials_table(study), scored, evaluator)
    return summary
