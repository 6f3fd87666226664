"""`kvsim validate` and `kvsim fidelity`: run policies live on trace samples, beside the simulator."""

from __future__ import annotations

import itertools
from pathlib import Path

import polars as pl
import typer
from rich.table import Table

from kvsim.cli.common import console, human_bytes, progress_bars, reports_errors
from kvsim.cli.simulate import budgets_from_options, policies_from_options, split_values
from kvsim.errors import KvsimError
from kvsim.live.fidelity import correlations, write_fidelity_report
from kvsim.live.validate import select_samples, summarize_validation, validate
from kvsim.paths import ensure_writable_dir, write_atomically
from kvsim.search.report import write_report
from kvsim.search.rundir import SearchRun
from kvsim.traces.models import load_model
from kvsim.traces.store import MODES, TraceSet, check_mode

VALIDATION_FILE = "validation.parquet"


@reports_errors
def validate_command(
    traces: Path | None = typer.Option(None, "--traces", help="TraceSet folder written by `kvsim capture` (not with --run)."),
    policy: list[str] = typer.Option([], help="Preset name, a policy spec .json, or 'all'; repeat or comma-separate."),
    budget: list[str] = typer.Option(["0.1"], help="Fractions of the prompt (0.1) or token counts (256); repeat or comma-separate."),
    out: Path | None = typer.Option(None, "--out", help=f"Output folder for {VALIDATION_FILE} (not with --run: RUNDIR holds it)."),
    run: Path | None = typer.Option(None, "--run", help="A `kvsim search` RUNDIR: validate its winners on its test samples."),
    top: int = typer.Option(3, min=1, help="With --run: how many winners."),
    model: str | None = typer.Option(None, help="Model to run (default: the one that captured the traces)."),
    samples: int | None = typer.Option(None, min=1, help="Validate only the first N samples of the mode."),
    mode: str = typer.Option("query-aware", help=f"Evaluation mode: {' or '.join(MODES)} (with --run: the run's)."),
) -> None:
    """Run each policy live on trace samples: task score, fidelity to the full cache (KL, top-1),
    KV bytes held and decode time, beside the simulator's prediction. With --run, the search's top
    policies run beside the presets (--policy, default all) on its test samples, and RUNDIR/report.html
    is rendered again with the live comparison.

    Example: [bold]kvsim validate --traces runs/demo/traces --policy snapkv,h2o --budget 0.1 --samples 2 --out runs/val[/]
    Example: [bold]kvsim validate --run runs/search --top 3 --policy snapkv,adakv[/]
    """
    if not split_values(policy) and run is None:
        raise KvsimError("say what to validate: --policy NAME|spec.json (or --run RUNDIR for a search's winners)")
    if run is not None:
        if traces is not None or out is not None:
            raise KvsimError("--run reads the traces from the search run and writes into it: drop --traces and --out")
        search = SearchRun(run)
        summary = search.summary()
        traceset = TraceSet.open(summary["traces"])
        policies = policies_from_options(policy or ["all"], traceset.statistics)
        winners = search.winners(top)
        budgets = list(dict.fromkeys(budget for _, budget in winners))
        pairs = winners + [(preset, budget) for budget in budgets for preset in policies]
        chosen = select_samples(traceset, summary["mode"], samples, search.test_samples())
        out = run
    else:
        if traces is None or out is None:
            raise KvsimError("give --traces and --out (or --run RUNDIR)")
        check_mode(mode)
        traceset = TraceSet.open(traces)
        pairs = list(itertools.product(policies_from_options(policy, traceset.statistics), budgets_from_options(budget)))
        chosen = select_samples(traceset, mode, samples)
    ensure_writable_dir(out, "output folder")
    loaded = load_model(model or traceset.meta["model"]["id"])
    path = search.validation_path if run is not None else out / VALIDATION_FILE
    table = run_with_progress(loaded, traceset, pairs, chosen, path)
    print_validation(table)
    console.print(f"validation table: {path}")
    if run is not None:
        write_report(search)
        console.print(f"report: {search.report_path}")


def run_with_progress(loaded, traceset, pairs, samples, partial: Path) -> pl.DataFrame:
    """Live runs with a progress bar; the table so far is written to `partial` after every sample."""
    with progress_bars() as progress:
        bar = progress.add_task(f"live runs of {len(pairs)} (policy, budget) pairs", total=len(samples) * len(pairs))
        return validate(
            loaded, traceset, pairs, samples, on_run=lambda: progress.advance(bar),
            on_sample=lambda table: write_atomically(partial, table.write_parquet),
        )


def print_validation(table: pl.DataFrame) -> None:
    summary = summarize_validation(table)
    view = Table("mode", "budget", "policy", "n", "sim_score", "answer log-lik.", "live score", "full score", "KL", "top-1",
                 "KV held", "ms/token")
    for row in summary.iter_rows(named=True):
        view.add_row(
            row["mode"], row["budget"], row["policy"], str(row["samples"]), f"{row['sim_score']:.3f}", f"{row['answer_logprob']:.3f}",
            f"{row['score']:.2f}", f"{row['full_cache_score']:.2f}", f"{row['kl']:.3f}", f"{row['top1']:.2f}",
            human_bytes(row["kv_bytes"]), f"{row['decode_ms_per_token']:.1f}",
        )
    console.print(view)


@reports_errors
def fidelity_command(
    traces: Path = typer.Option(..., "--traces", help="TraceSet folder written by `kvsim capture`."),
    out: Path = typer.Option(..., "--out", help="Output folder for fidelity.parquet, correlations.csv, fidelity.png/.html."),
    policy: list[str] = typer.Option(["all"], help="Policies to spread over; 'all' presets by default."),
    budget: list[str] = typer.Option(["0.05,0.2"], help="Budgets to spread over; repeat or comma-separate."),
    model: str | None = typer.Option(None, help="Model to run (default: the one that captured the traces)."),
    samples: int | None = typer.Option(4, min=1, help="Samples per (policy, budget) pair."),
    mode: str = typer.Option("query-aware", help=f"Evaluation mode: {' or '.join(MODES)}."),
) -> None:
    """Run many (policy, budget) pairs both simulated and live and report how well sim_score ranks them.

    Example: [bold]kvsim fidelity --traces runs/demo/traces --samples 4 --out runs/fidelity[/]
    """
    check_mode(mode)
    traceset = TraceSet.open(traces)
    policies = policies_from_options(policy, traceset.statistics)
    budgets = budgets_from_options(budget)
    if len(policies) * len(budgets) < 3:
        raise KvsimError("rank correlations need at least 3 (policy, budget) pairs: give more policies or budgets")
    chosen = select_samples(traceset, mode, samples)
    ensure_writable_dir(out, "output folder")
    loaded = load_model(model or traceset.meta["model"]["id"])
    table = run_with_progress(loaded, traceset, list(itertools.product(policies, budgets)), chosen, out / "fidelity.parquet")
    paths = write_fidelity_report(table, out)
    found = correlations(table).filter(pl.col("level") == "pairs")
    view = Table("simulated", "live", "pairs", "Spearman", "Kendall")
    for row in found.iter_rows(named=True):
        fmt = lambda v: "–" if v is None else f"{v:+.3f}"  # noqa: E731
        view.add_row(row["simulated"], row["live"], str(row["n"]), fmt(row["spearman"]), fmt(row["kendall"]))
    console.print(view)
    console.print(f"fidelity report: {paths['fidelity.html']}")
