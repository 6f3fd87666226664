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
from kvsim.search.objective import DEFAULT_PROMOTE, OBJECTIVES, TIERS
from kvsim.search.space import DEFAULT_BASE
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
    time_limit: float | None = typer.Option(
        None, "--time-limit", min=0.1, help="Minutes of trials per worker: no trial starts after them (the run stops at --trials or here, whichever comes first)."
    ),
    study: str = typer.Option("kvsim", help="Study name; running again with the same name resumes it."),
    objective: str = typer.Option("quality", help=f"{' or '.join(OBJECTIVES)}: the best policy at the budget, or quality vs KV bytes."),
    tier: str = typer.Option(
        "exact", help=f"{' or '.join(TIERS)}: rank by the real model's answer log-likelihood (proxy prunes), or by the proxy alone."
    ),
    promote: float = typer.Option(DEFAULT_PROMOTE, help="Exact tier: quantile of proxy scores among earlier trials with the same scorer that a trial must reach to be scored by the model."),
    storage: str | None = typer.Option(
        None, help="postgresql://user:password@host:port/db to share the study between machines; default: embedded in --out."
    ),
    workers: int = typer.Option(1, help="Worker processes on this machine (more than 1: a journal file, or --storage)."),
    sampler: str = typer.Option("tpe", help=f"One of {', '.join(SAMPLERS)} (cmaes searches the per-layer budget vector)."),
    mode: str | None = typer.Option(None, help="Evaluation mode to search on (default: the traces' only mode)."),
    validation: float = typer.Option(0.25, help="Share of each task's samples that re-rank the best trials."),
    test: float = typer.Option(0.25, help="Share of each task's samples kept for the live report only (`kvsim validate --run`)."),
    seed: int = typer.Option(0, help="Seed of the split and the samplers."),
    top: int = typer.Option(3, help="How many best policies to write to top/."),
    prefill_only: bool = typer.Option(
        False, "--prefill-only", help="Search only policies that decide once after the prompt (and those presets): ~10x cheaper per exact trial."
    ),
    base: str = typer.Option(
        DEFAULT_BASE, help="--sampler cmaes: the policy (preset or .json spec) whose per-layer budgets are tuned; its allocator is replaced."
    ),
    heartbeat: int = typer.Option(
        DEFAULT_HEARTBEAT_S, help="PostgreSQL: seconds between worker heartbeats; a trial silent for twice that is retried."
    ),
) -> None:
    """Search eviction policies and per-layer budgets on captured traces, with Optuna.

    Example: [bold]kvsim search --traces traces/smol --budget 0.05 --trials 300 --study smol --out runs/search[/]
    """
    settings = SearchSettings(
        traces=traces, budget=parse_budget(budget), rundir=out, study=study, trials=trials, objective=objective,
        storage=storage, workers=workers, sampler=sampler, mode=mode, seed=seed, validation=validation, test=test, top=top,
        tier=tier, promote=promote, heartbeat_s=heartbeat, prefill_only=prefill_only, base=base,
        time_limit_s=None if time_limit is None else 60 * time_limit,
    )
    # The bar starts once the inputs are checked, so a bad input prints its error line alone.
    progress, bars = progress_bars(), []

    def advance(done: int) -> None:
        if not bars:
            progress.start()
            bars.append(progress.add_task(f"study {study}: {trials} trials", total=trials))
        progress.advance(bars[0], done)

    try:
        run = run_search(settings, advance)
    finally:
        if bars:
            progress.stop()
    summary = run.summary()
    print_top(summary)
    warn_without_signal(summary)
    warn_missing_statistics(summary)
    console.print(f"report: {run.report_path}\nstudy: {summary['storage']} (optuna-dashboard {summary['storage']})")


def parse_budget(text: str) -> Budget | BudgetRange:
    values = [Budget.parse(value) for value in split_values([text])]
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return BudgetRange(*values)
    raise KvsimError(f"--budget {text!r}: give one budget (0.05) or a range of two (0.02,0.2)")


def print_top(summary: dict) -> None:
    exact = summary["tier"] == "exact"
    columns = ["answer log-lik.", "answer match", "KL"] if exact else ["sim_score"]
    table = Table("rank", "policy", "trial", "budget", "search value", *[f"{c} (validation)" for c in columns], "KV MiB", "spec")
    for entry in summary["top"]:
        validation = entry["validation"]
        values = [validation[k] for k in (("answer_logprob", "answer_match", "kl") if exact else ("sim_score",))]
        table.add_row(
            str(entry["rank"]), entry["name"], str(entry["provenance"]["trial"]), str(entry["budget"]), f"{entry['search_value']:.4f}",
            *[f"{v:.3f}" for v in values], f"{validation['kv_mib']:.2f}", entry["spec"],
        )
    console.print(table)


def warn_missing_statistics(summary: dict) -> None:
    """Name the presets the search could not run or compose from: a strong one (KVzip) may be among them."""
    for name, options in summary.get("presets_without_statistics", {}).items():
        flags = " ".join(f"--{option}" for option in options)
        console.print(
            f"warning: preset {name} and its scorer were not searched: the traces lack its statistics; "
            f"capture with `kvsim capture {flags}` to include them",
            style="yellow",
            highlight=False,
        )


def warn_without_signal(summary: dict) -> None:
    """Say so when no preset keeps any answer at this budget: the search then ranks on noise."""
    presets = [p for p in summary.get("presets", []) if p["name"] != "full" and "answer_match" in p["validation"]]
    if presets and all(p["validation"]["answer_match"] == 0 for p in presets):
        console.print(
            f"warning: no preset keeps a single reference answer at budget {summary['budget']} on the validation "
            "samples (teacher-forced answer match 0): the model has little signal here; search at a higher budget",
            style="yellow",
            highlight=False,
        )
