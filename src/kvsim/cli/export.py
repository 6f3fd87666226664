"""`kvsim export`: write a policy and budget as a file other code applies with `kvsim.load_policy`."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer

from kvsim.cli.common import console, human_bytes, reports_errors
from kvsim.errors import KvsimError
from kvsim.live.export import ExportedModel, ExportedPolicy
from kvsim.live.kvpress_export import write_press_script
from kvsim.paths import check_output_file
from kvsim.policies import Budget, resolve_policy
from kvsim.search.compare import against_best_preset, compare_with_presets, summary_line
from kvsim.search.rundir import SearchRun
from kvsim.sim import simulate
from kvsim.traces.models import load_model
from kvsim.traces.store import TraceSet

METRIC_COLUMNS = (
    "sim_score", "attn_recall", "out_err", "kv_bytes", "score", "answer_logprob", "answer_match", "kl", "top1", "decode_ms_per_token",
)


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
    check_output_file(out, "--out")
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
    check_output_file(out, "--out")
    path = exported.write(out)
    console.print(f"exported {exported.policy.name} at budget {exported.budget.label} for {exported.model.id}: {path}")
    if kvpress:
        try:
            console.print(f"kvpress script: {write_press_script(exported.policy, exported.budget, path.with_suffix('.kvpress.py'))}")
        except KvsimError as err:
            console.print(f"no kvpress script: {err}")
    return path


def export_search_winner(rundir: Path, out: Path, kvpress: bool) -> None:
    """Export the run's best policy, then print where everything is and a summary."""
    search = SearchRun(rundir)
    summary = search.summary()
    (winner, budget), entry = search.winners(1)[0], summary["top"][0]
    traceset = TraceSet.open(summary["traces"])
    live = search.validation()
    metrics = {
        "search": {"value": entry["search_value"], "tier": summary["tier"]},
        "validation_samples": entry["validation"],
        "validated": None if live is None else validated_metrics(live, search.validation_path, winner.name, budget),
    }
    provenance = {
        "traceset": {"path": summary["traces"], "hash": traceset.content_hash},
        "study": summary["study"],
        "trial": entry["provenance"]["trial"],
    }
    path = write_export(ExportedPolicy(winner, budget, exported_model(None, traceset), provenance, metrics), out, kvpress)
    for line in run_summary(search, winner.name, live, path):
        console.print(line, highlight=False)


def run_summary(search: SearchRun, winner: str, live: pl.DataFrame | None, export_path: Path) -> list[str]:
    entry = search.summary()["top"][0]
    validation = entry["validation"]
    score = (f"answer log-likelihood {validation['answer_logprob']:.3f}, KL {validation['kl']:.3f}"
             if "answer_logprob" in validation else f"sim_score {validation['sim_score']:.3f}")
    lines = [f"winner: {winner} at budget {entry['budget']}: {score} on the validation samples, "
             f"{human_bytes(validation['kv_mib'] * 2**20)} KV per sample"]
    if live is None:
        lines.append("not validated live: run `kvsim validate --run` for the comparison on the test samples")
    else:
        lines += [summary_line(c) for c in against_best_preset(compare_with_presets(live, winner)).values()]
    lines.append(f"exported {export_path}; report {search.report_path}")
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
