"""`kvsim simulate`: replay a TraceSet under policies and budgets, no model needed."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import polars as pl
import typer
from rich.table import Table

from kvsim.cli.common import console, progress_bars, reports_errors
from kvsim.errors import KvsimError
from kvsim.paths import check_output_file, write_atomically
from kvsim.policies import PRESETS, Budget, Policy, resolve_policies
from kvsim.sim import simulate as run_simulation
from kvsim.sim.report import leaderboard, write_report
from kvsim.traces.store import MODES, TraceSet, check_mode


PARQUET_MAGIC = b"PAR1"


def split_values(values: list[str]) -> list[str]:
    """Options may be repeated or comma-separated: `--budget 0.05,0.1 --budget 0.2`."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def policies_from_options(values: list[str], statistics: Collection[str] | None = None) -> list[Policy]:
    """`--policy` values: preset names, spec files, and 'all' for every preset (every one the traces
    can run, when their `statistics` are given; a preset named explicitly is refused instead).
    Names must tell the policies apart (`resolve_policies`)."""

    def expand(item: str) -> list[str]:
        if item != "all":
            return [item]
        return [name for name, preset in PRESETS.items() if statistics is None or preset.requirements() <= set(statistics)]

    return resolve_policies([name for item in split_values(values) for name in expand(item)])


def budgets_from_options(values: list[str]) -> list[Budget]:
    budgets = [Budget.parse(value) for value in split_values(values)]
    if not budgets:
        raise KvsimError("--budget is empty: give fractions of the prompt (0.1) or token counts (256)")
    return budgets


@reports_errors
def simulate(
    traces: Path = typer.Option(..., "--traces", help="TraceSet folder written by `kvsim capture`."),
    policy: list[str] = typer.Option(
        ["all"], help="Preset name, a policy spec .json, or 'all' presets; repeat or comma-separate."
    ),
    budget: list[str] = typer.Option(
        ["0.05,0.1,0.2"], help="Fractions of the prompt (0.1) or token counts (256); repeat or comma-separate."
    ),
    out: Path = typer.Option(..., "--out", help="Parquet file for the per-layer table; the per-sample table goes beside it."),
    mode: str | None = typer.Option(None, help=f"Only one evaluation mode ({', '.join(MODES)}); default all."),
    oracle: bool = typer.Option(True, help="Also report the hindsight-optimal selection as policy 'oracle'."),
    report: Path | None = typer.Option(None, help="Also write a Markdown report with plots to this .md file."),
) -> None:
    """Replay captured traces under eviction policies at several budgets and report the metrics.

    Example: [bold]kvsim simulate --traces traces/smol --policy snapkv,h2o --budget 0.05,0.1 --out sim.parquet[/]
    """
    if mode is not None:
        check_mode(mode)
    traceset = TraceSet.open(traces)
    policies = policies_from_options(policy, traceset.statistics)
    if not policies:
        raise KvsimError("--policy is empty: give preset names, spec .json files, or 'all'")
    budgets = budgets_from_options(budget)
    samples_path = out.with_name(out.stem + ".samples.parquet")
    for path in (out, samples_path):
        check_output_file(path, "--out", PARQUET_MAGIC)
    if report is not None:
        check_output_file(report, "--report")
    samples = traceset.manifest.height if mode is None else traceset.manifest.filter(pl.col("mode") == mode).height
    with progress_bars() as progress:
        bar = progress.add_task(f"simulating {len(policies)} policies × {len(budgets)} budgets", total=samples)
        result = run_simulation(traceset, policies, budgets, mode=mode, oracle=oracle, on_sample=lambda s: progress.advance(bar))
    write_atomically(out, result.layers.write_parquet)
    write_atomically(samples_path, result.samples.write_parquet)
    print_leaderboard(result.samples)
    console.print(f"per-layer table: {out}\nper-sample table: {samples_path}")
    if report is not None:
        write_report(result, report, f"Simulation of {traces}")
        console.print(f"report: {report}")


def print_leaderboard(samples: pl.DataFrame) -> None:
    board = leaderboard(samples)
    table = Table("mode", "budget", "policy", "sim_score", "attn recall", "out err", "evidence", "KV MiB")
    for row in board.iter_rows(named=True):
        evidence = "–" if row["evidence_recall"] is None else f"{row['evidence_recall']:.3f}"
        table.add_row(
            row["mode"], row["budget"], row["policy"], f"{row['sim_score']:.3f}", f"{row['attn_recall']:.3f}",
            f"{row['out_err']:.3f}", evidence, f"{row['kv_bytes'] / 2**20:.2f}",
        )
    console.print(table)
