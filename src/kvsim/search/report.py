"""`report.html`: one self-contained page on a search (figures inlined as PNG), readable offline.

It shows how the study went (optimization history, or the Pareto front), which parameters
mattered (Optuna's importances), where the winner puts its cache (per-layer budgets beside the
presets' on one held-out sample), and the winners and presets on the held-out samples, the number
that says whether the search generalizes.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
import polars as pl  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from kvsim.paths import write_atomically  # noqa: E402
from kvsim.policies.compress import allocate  # noqa: E402
from kvsim.search.objective import Evaluator  # noqa: E402
from kvsim.search.outputs import Scored  # noqa: E402

# Presets whose allocators differ, so the per-layer plot shows every allocation shape once.
ALLOCATION_PRESETS = ("snapkv", "pyramidkv", "adakv", "cake", "prefixkv", "d2o", "razor")
MAX_IMPORTANCES = 15


def write_report(path: Path, summary: dict, study: optuna.Study, trials: pl.DataFrame, scored: list[Scored], evaluator: Evaluator) -> Path:
    objective = summary["objective"]
    sections = [
        f"<h1>kvsim search: study {html.escape(summary['study'])}</h1>",
        _overview(summary),
        "<h2>Pareto front</h2>" if objective == "pareto" else "<h2>Optimization history</h2>",
        _figure(_plot_front(trials) if objective == "pareto" else _plot_history(trials)),
        "<h2>Parameter importances</h2>",
        _importances(study, objective),
    ]
    if scored:
        sample_ids = summary["samples"]["held_out"] or summary["samples"]["search"]
        sections += [
            "<h2>Per-layer budgets</h2>",
            f"<p>Budget of each layer relative to a uniform split, at budget {scored[0].budget.label}, on sample "
            f"<code>{html.escape(sample_ids[0])}</code>.</p>",
            _figure(_plot_layer_budgets(scored, evaluator, sample_ids[0])),
            "<h2>Winners and presets</h2>",
            _scores_table(scored, bool(summary["samples"]["held_out"])),
        ]
    page = "\n".join(["<!doctype html><html><head><meta charset='utf-8'>", f"<title>kvsim search {html.escape(summary['study'])}</title>",
                      "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:2px 8px;text-align:right}"
                      "td:first-child,th:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>",
                      "</head><body>", *sections, "</body></html>"])
    write_atomically(path, lambda tmp: tmp.write_text(page))
    return path


def _overview(summary: dict) -> str:
    budget = summary["budget"]
    budget_text = f"{budget[0]}–{budget[1]}" if isinstance(budget, list) else str(budget)
    counts = ", ".join(f"{count} {state}" for state, count in summary["trials"].items())
    storage = html.escape(summary["storage"])
    return (
        f"<p>Objective <b>{summary['objective']}</b> at budget {budget_text}, mode {summary['mode']}, "
        f"traces <code>{html.escape(summary['traces'])}</code>. Trials: {counts}. "
        f"{len(summary['samples']['search'])} search samples, {len(summary['samples']['held_out'])} held-out.</p>"
        f"<p>Storage <code>{storage}</code>; browse it live with <code>optuna-dashboard {storage}</code>"
        f"{' (a journal file: see the README)' if storage.endswith('.journal') else ''}.</p>"
    )


def _figure(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _plot_history(trials: pl.DataFrame) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 4))
    complete = trials.filter(pl.col("state") == TrialState.COMPLETE.name).sort("number")
    pruned = trials.filter((pl.col("state") == TrialState.PRUNED.name) & pl.col("sim_score").is_not_null())
    axes.scatter(pruned["number"], pruned["sim_score"], marker="x", color="0.7", s=12, label="pruned (mean so far)")
    axes.scatter(complete["number"], complete["sim_score"], s=12, label="complete")
    if complete.height:
        axes.step(complete["number"], complete["sim_score"].cum_max(), where="post", color="black", label="best so far")
    axes.set(xlabel="trial", ylabel="mean sim_score (search samples)")
    axes.legend(loc="lower right")
    return figure


def _plot_front(trials: pl.DataFrame) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    complete = trials.filter(pl.col("state") == TrialState.COMPLETE.name).sort("kv_mib")
    axes.scatter(complete["kv_mib"], complete["sim_score"], s=12, color="0.6", label="trials")
    front = complete.filter(pl.col("sim_score") > pl.col("sim_score").shift(1).cum_max().fill_null(float("-inf")))
    axes.plot(front["kv_mib"], front["sim_score"], marker="o", color="black", label="Pareto front")
    axes.set(xlabel="KV MiB per sample", ylabel="mean sim_score (search samples)")
    axes.legend(loc="lower right")
    return figure


def _importances(study: optuna.Study, objective: str) -> str:
    target = (lambda trial: trial.values[0]) if objective == "pareto" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" on flat studies: the plot shows it
            importances = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as err:  # too few trials, or a space with one point
        return f"<p>Not available: {html.escape(str(err))}</p>"
    if not importances:
        return "<p>Not available: no completed trial with parameters.</p>"
    names = list(importances)[:MAX_IMPORTANCES][::-1]
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(names) + 1))
    axes.barh(names, [importances[name] for name in names])
    axes.set(xlabel="importance (Optuna's default evaluator, normalized to sum 1)")
    return _figure(figure)


def _plot_layer_budgets(scored: list[Scored], evaluator: Evaluator, sample_id: str) -> plt.Figure:
    prepared = evaluator.prepared(sample_id)
    figure, axes = plt.subplots(figsize=(8, 4))
    shown = [scored[0]] + [s for s in scored if s.trial is None and s.policy.name in ALLOCATION_PRESETS]
    for entry in shown:
        _, budgets = allocate(entry.policy, prepared.views, entry.budget, prepared.sample.prompt_len)
        per_layer = budgets.double().mean(dim=1)
        relative = per_layer / per_layer.mean()
        style = {"color": "black", "linewidth": 2.5} if entry is scored[0] else {"linewidth": 1, "alpha": 0.8}
        axes.plot(range(len(relative)), relative.tolist(), label=entry.policy.name, **style)
    axes.axhline(1.0, color="0.8", linestyle=":")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="layer", ylabel="layer budget / uniform")
    axes.legend(fontsize=8, ncols=2)
    return figure


def _scores_table(scored: list[Scored], has_held_out: bool) -> str:
    def number(value: float | None, digits: int = 4) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = sorted(scored, key=lambda s: (s.trial is None, -(s.held_out if s.held_out is not None else s.search or -1)))
    lines = ["<table><tr><th>policy</th><th>trial</th><th>budget</th><th>sim_score search</th>"
             f"<th>sim_score held-out</th><th>KV MiB{' (held-out)' if has_held_out else ''}</th></tr>"]
    for entry in rows:
        lines.append(
            f"<tr><td>{html.escape(entry.policy.name)}</td><td>{'' if entry.trial is None else entry.trial}</td>"
            f"<td>{entry.budget.label}</td><td>{number(entry.search)}</td><td>{number(entry.held_out)}</td>"
            f"<td>{number(entry.kv_mib, 2)}</td></tr>"
        )
    lines.append("</table><p>Search scores of presets come from trials that drew them; – where none did.</p>")
    return "\n".join(lines)
