"""`kvsim traces info|verify`: look at a TraceSet and check its files."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer
from rich.table import Table

from kvsim.cli.common import console, err_console, human_bytes, print_labelled, reports_errors
from kvsim.traces.store import TraceSet

app = typer.Typer(help="Inspect and check TraceSet folders.", no_args_is_help=True, rich_markup_mode="rich")


@app.command()
@reports_errors
def info(traces: Path = typer.Argument(..., help="TraceSet folder.")) -> None:
    """Summarize a TraceSet: samples per task and mode, lengths, bytes on disk, full-cache accuracy.

    Example: [bold]kvsim traces info traces/smol[/]
    """
    print_summary(TraceSet.open(traces))


@app.command()
@reports_errors
def verify(traces: Path = typer.Argument(..., help="TraceSet folder.")) -> None:
    """Check every sample file's checksum, tensor shapes and own sample id and mode; exit 1 naming
    each bad file. Temporary files an interrupted capture left are listed (they do no harm).

    Example: [bold]kvsim traces verify traces/smol[/]
    """
    traceset = TraceSet.open(traces)
    problems = traceset.verify()
    for problem in problems:
        print_labelled(err_console, "bad:", str(traces / problem))
    for leftover in traceset.leftover_temporary_files():
        print_labelled(err_console, "note:", f"{leftover} is a temporary file left by an interrupted write: delete it")
    if problems:
        raise typer.Exit(1)
    console.print(f"ok: {len(traceset)} sample files verified in {traces}")


def print_summary(traceset: TraceSet) -> None:
    meta, manifest = traceset.meta, traceset.manifest
    model = meta["model"]
    console.print(
        f"{traceset.root}  model {model['id']} ({traceset.shape.model_type}, {traceset.shape.describe()})  "
        f"window {meta['window']}  "
        f"dtype {meta['storage_dtype']}  workload {meta['workload']['spec']} (seed {meta['workload']['seed']})"
    )
    if manifest.is_empty():
        console.print("no samples captured yet")
        return
    table = Table("task", "mode", "samples", "prompt tokens", "generated", "full-cache score", "on disk")
    groups = (
        manifest.group_by("task", "mode")
        .agg(
            pl.len().alias("n"),
            pl.col("prompt_len").min().alias("lo"),
            pl.col("prompt_len").max().alias("hi"),
            pl.col("gen_len").mean().alias("gen"),
            pl.col("score").mean().alias("score"),
            pl.col("bytes").sum().alias("bytes"),
        )
        .sort("task", "mode")
    )
    for row in groups.iter_rows(named=True):
        lengths = f"{row['lo']}–{row['hi']}" if row["lo"] != row["hi"] else str(row["lo"])
        table.add_row(
            row["task"], row["mode"], str(row["n"]), lengths, f"{row['gen']:.1f}", f"{row['score']:.2f}",
            human_bytes(row["bytes"]),
        )
    console.print(table)
    total_bytes = manifest["bytes"].sum()
    total_tokens = manifest["total_len"].sum()
    console.print(
        f"{len(traceset)} sample files, {human_bytes(total_bytes)} on disk, "
        f"{total_bytes / total_tokens / 1024:.1f} KiB per token; full-cache score {manifest['score'].mean():.2f}"
    )
