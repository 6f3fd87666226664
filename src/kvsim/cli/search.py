"""`kvsim search`: find the best policy for a TraceSet and a budget with Optuna."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvsim.cli.common import console, progress_bars, reports_errors
from kvsim.cli.simulate import split_values
from kvsim.errors import KvsimError
from kvsim.policies import Budget
from kvsim.search import BudgetRange, SearchSettings
from kvsim.search import search as run_search
from kvsim.search.objective import OBJECTIVES
from kvsim.search.storage import DEFAULT_HEARTBEAT_S
from kvsim.search.study import SAMPLERS


@reports_errors
def search(
    traces: Path = typer.Option(..., "--traces", help="TraceSet folder written by `kvsim capture`."),
    budget: str = typer.Option(
        "0.05", help="quality: one budget (0.05 of the prompt, or 256 tokens); pareto: a range 'low,high'."
    ),
    out: Path = typer.Option(..., "--out", help="Run folder: the embedded study, trials.parquet, top/, report.html, search.json."),
    trials: int = typer.Option(100, help="Trials this run adds to the study (shared by its workers)."),
    study: str = typer.Option("kvsim", help="Study name; running again with the same name resumes it."),
    objective: str = typer.Option("quality", help=f"{' or '.join(OBJECTIVES)}: best sim_score at the budget, or sim_score vs KV bytes."),
    storage: str | None = typer.Option(
        None, help="postgresql://user:password@host:port/db to share the study between machines; default: embedded in --out."
    ),
    workers: int = typer.Option(1, help="Worker processes on this machine (more than 1: a journal file, or --storage)."),
    sampler: str = typer.Option("tpe", help=f"One of {', '.join(SAMPLERS)} (cmaes searches the per-layer budget vector)."),
    mode: str = typer.Option("query-aware", help="Evaluation mode of the traces to search on."),
    held_out: float = typer.Option(0.25, help="Share of each task's samples kept out of the search, to report on."),
    seed: int = typer.Option(0, help="Seed of the split and the samplers."),
    top: int = typer.Option(3, help="How many best policies to write to top/."),
    heartbeat: int = typer.Option(
        DEFAULT_HEARTBEAT_S, help="PostgreSQL: seconds between worker heartbeats; a trial silent for twice that is retried."
    ),
) -> None:
    """Search eviction policies and per-layer budgets on captured traces, with Optuna.

    Example: [bold]kvsim search --traces traces/smol --budget 0.05 --trials 300 --study smol --out runs/search[/]
    """
    settings = SearchSettings(
        traces=traces, budget=parse_budget(budget), rundir=out, study=study, trials=trials, objective=objective,
        storage=storage, workers=workers, sampler=sampler, mode=mode, seed=seed, held_out=held_out, top=top,
        heartbeat_s=heartbeat,
    )
    # The bar starts once the inputs are checked, so a bad input prints its error line alone.
    progress, bars = progress_bars(), []

    def advance(done: int) -> None:
        if not bars:
            progress.start()
            bars.append(progress.add_task(f"study {study}: {trials} trials", total=trials))
        progress.advance(bars[0], done)

    try:
        summary = run_search(settings, advance)
    finally:
        if bars:
            progress.stop()
    print_top(summary)
    console.print(f"report: {out / summary['report']}\nstudy: {summary['storage']} (optuna-dashboard {summary['storage']})")


def parse_budget(text: str) -> Budget | BudgetRange:
    values = [Budget.parse(value) for value in split_values([text])]
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return BudgetRange(*values)
    raise KvsimError(f"--budget {text!r}: give one budget (0.05) or a range of two (0.02,0.2)")


def print_top(summary: dict) -> None:
    table = Table("rank", "trial", "budget", "sim_score search", "sim_score held-out", "KV MiB", "spec")
    for entry in summary["top"]:
        held_out = entry["sim_score"]["held_out"]
        table.add_row(
            str(entry["rank"]), str(entry["provenance"]["trial"]), str(entry["budget"]), f"{entry['sim_score']['search']:.4f}",
            "–" if held_out is None else f"{held_out:.4f}", f"{entry['kv_mib']:.2f}", entry["spec"],
        )
    console.print(table)
