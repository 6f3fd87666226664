"""`kvsim export`: write a policy and budget as a file other code applies with `kvsim.load_policy`."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer

from kvsim.cli.common import console, human_bytes, reports_errors
from kvsim.cli.validate import VALIDATION_FILE
from kvsim.errors import KvsimError
from kvsim.live.export import ExportedModel, ExportedPolicy
from kvsim.live.kvpress_export import write_press_script
from kvsim.live.search_run import read_search_run
from kvsim.live.validate import summarize_validation
from kvsim.paths import ensure_writable_dir
from kvsim.policies import Budget, resolve_policy
from kvsim.sim import simulate
from kvsim.traces.models import load_model
from kvsim.traces.store import TraceSet

METRIC_COLUMNS = ("sim_score", "attn_recall", "out_err", "kv_bytes", "score", "kl", "top1", "decode_ms_per_token")


@reports_errors
def export(
    policy: str | None = typer.Option(None, help="Preset name or policy spec .json (not with --run)."),
    out: Path = typer.Option(..., "--out", help="The exported policy file (.json)."),
    budget: str = typer.Option("0.1", help="Fraction of the prompt (0.1) or token count (256)."),
    model: str | None = typer.Option(None, help="Model the policy is for (default: the one that captured --traces)."),
    traces: Path | None = typer.Option(None, help="TraceSet the policy was tuned on: records its hash and simulated metrics."),
    validation: Path | None = typer.Option(None, help="validation.parquet from `kvsim validate`: records the live metrics."),
    study: str | None = typer.Option(None, help="Search study the policy came from, for provenance."),
    trial: int | None = typer.Option(None, help="Trial number in that study, for provenance."),
    kvpress: bool = typer.Option(False, help="Also write a kvpress press script beside the file, where the policy maps onto presses."),
    run: Path | None = typer.Option(None, "--run", help="A `kvsim search` RUNDIR: export its best policy with the run's evidence."),
) -> None:
    """Export a policy spec with its budget, model and evidence; load it with kvsim.load_policy(path).

    Example: [bold]kvsim export --policy snapkv --budget 0.1 --traces runs/demo/traces --out winner.json[/]
    Example: [bold]kvsim export --run runs/demo --out runs/demo/winner.json[/]
    """
    if run is not None:
        export_search_winner(run, out, kvpress)
        return
    if policy is None:
        raise KvsimError("say what to export: --policy NAME|spec.json, or --run RUNDIR for a search's winner")
    chosen = resolve_policy(policy)
    chosen_budget = Budget.parse(budget)
    if model is None and traces is None:
        raise KvsimError("say which model the policy is for: give --model or --traces")
    traceset = TraceSet.open(traces) if traces is not None else None
    target = exported_model(model, traceset)
    chosen.check_model(len(target.shape.policy_layers))
    provenance = {
        "traceset": None if traceset is None else {"path": str(traces), "hash": traceset.content_hash},
        "study": study,
        "trial": trial,
    }
    metrics = {
        "simulated": None if traceset is None else simulated_metrics(traceset, chosen, chosen_budget),
        "validated": None if validation is None else validated_metrics(read_validation(validation), validation, chosen.name, chosen_budget),
    }
    write_export(ExportedPolicy(chosen, chosen_budget, target, provenance, metrics), out, kvpress)


def write_export(exported: ExportedPolicy, out: Path, kvpress: bool) -> Path:
    ensure_writable_dir(out.parent, "output folder")
    path = exported.write(out)
    console.print(f"exported {exported.policy.name} at budget {exported.budget.label} for {exported.model.id}: {path}")
    if kvpress:
        try:
            console.print(f"kvpress script: {write_press_script(exported.policy, exported.budget, path.with_suffix('.kvpress.py'))}")
        except KvsimError as err:
            console.print(f"no kvpress script: {err}")
    return path


def export_search_winner(rundir: Path, out: Path, kvpress: bool) -> None:
    """Export the run's best policy, then print where everything is and a three-line summary."""
    search = read_search_run(rundir, top=1)
    (winner, budget), entry = search.winners[0], search.top_entries[0]
    traceset = TraceSet.open(search.traces)
    validation = rundir / VALIDATION_FILE
    live = read_validation(validation) if validation.is_file() else None
    metrics = {
        "simulated": {"sim_score": entry["sim_score"], "kv_mib": entry.get("kv_mib")},
        "validated": None if live is None else validated_metrics(live, validation, winner.name, budget),
    }
    provenance = {
        "traceset": {"path": str(search.traces), "hash": traceset.content_hash},
        "study": search.study,
        "trial": entry["provenance"]["trial"],
    }
    path = write_export(ExportedPolicy(winner, budget, exported_model(None, traceset), provenance, metrics), out, kvpress)
    for line in run_summary(search, live, path):
        console.print(line, highlight=False)


def run_summary(search, live: pl.DataFrame | None, export_path: Path) -> list[str]:
    winner, budget = search.winners[0]
    entry = search.top_entries[0]
    lines = [f"winner: {winner.name} at budget {budget.label}, sim_score {entry['sim_score']['search']:.3f} on search samples"
             + ("" if entry["sim_score"].get("held_out") is None else f", {entry['sim_score']['held_out']:.3f} held out")]
    if live is not None:
        means = summarize_validation(live)
        row = means.filter(pl.col("policy") == winner.name).row(0, named=True)
        presets = means.filter(~pl.col("policy").str.starts_with("top") & (pl.col("policy") != "full") & (pl.col("budget") == budget.label))
        best = presets.sort("score", "top1", descending=True).row(0, named=True) if presets.height else None
        versus = "" if best is None else f"; best preset {best['policy']} {best['score']:.2f} (top-1 {best['top1']:.2f})"
        lines.append(
            f"live on {row['samples']} held-out samples: task score {row['score']:.2f} (full cache {row['full_cache_score']:.2f}), "
            f"top-1 {row['top1']:.2f}, KL {row['kl']:.3f}, KV held {human_bytes(row['kv_bytes'])}{versus}"
        )
    else:
        lines.append("not validated live: run `kvsim validate --run` for live scores")
    lines.append(f"exported {export_path}; report {search.rundir / 'report.html'}")
    return lines


def exported_model(model: str | None, traceset: TraceSet | None) -> ExportedModel:
    if model is None:
        return ExportedModel(traceset.meta["model"]["id"], traceset.meta["model"]["config_hash"], traceset.shape)
    loaded = load_model(model)
    exported = ExportedModel(loaded.source.name, loaded.config_hash, loaded.shape)
    if traceset is not None and traceset.meta["model"]["config_hash"] != exported.config_hash:
        raise KvsimError(f"--traces were captured from {traceset.meta['model']['id']}, not {model}: export with matching traces")
    return exported


def simulated_metrics(traceset: TraceSet, policy, budget: Budget) -> dict:
    return _means(simulate(traceset, [policy], [budget], oracle=False).samples)


def read_validation(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.ComputeError) as err:
        raise KvsimError(f"cannot read validation table {path}: {err}") from err


def validated_metrics(table: pl.DataFrame, path: Path, name: str, budget: Budget) -> dict:
    """Means of `name`'s live runs at `budget` in the validation table read from `path`."""
    rows = table.filter((pl.col("policy") == name) & (pl.col("budget") == budget.label))
    if rows.is_empty():
        raise KvsimError(f"{path} has no live runs of {name} at budget {budget.label}: run `kvsim validate` with them")
    return _means(rows)


def _means(table: pl.DataFrame) -> dict:
    present = [column for column in METRIC_COLUMNS if column in table.columns]
    means = table.select(pl.col(present).mean()).row(0, named=True)
    return {"samples": table.height, **{key: float(value) for key, value in means.items() if value is not None}}
