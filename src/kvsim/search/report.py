"""`report.html`: one self-contained page on a search run (figures inlined as PNG), readable offline.

Rendered from the run folder alone (`search.json`, `trials.parquet`, and `validation.parquet` once
`kvsim validate --run` has run the winner and the presets live on the test samples), so every
command that adds a file renders the whole page again; nothing patches it. Top to bottom: the
verdict (does the winner beat the best preset on the test samples, per budget, with paired
intervals), the live comparison, the search's best-so-far curve, parameter importances over all
trials and within the winner's family, per-layer budgets, and the validation re-ranking.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from kvsim.paths import write_atomically  # noqa: E402
from kvsim.search.compare import against_best_preset, compare_with_presets, summary_line  # noqa: E402
from kvsim.search.rundir import SearchRun  # noqa: E402

STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}img{max-width:100%;height:auto}"
    "td,th{padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}table{border-collapse:collapse}"
    "tr:nth-child(even){background:#f4f4f4}.verdict{font-size:1.1em;background:#eef;padding:.5em 1em}"
)
FIGURE_WIDTH = 10  # inches at 110 dpi: 1100 px, inside a 1280 px window


def write_report(run: SearchRun) -> None:
    summary, trials, live = run.summary(), run.trials(), run.validation()
    winner = f"top1-{summary['top'][0]['name']}" if summary.get("top") else None
    sections = [f"<h1>kvsim search: study {html.escape(summary['study'])}</h1>", _overview(summary)]
    if live is not None and winner is not None:
        sections += _live_sections(live, winner)
    else:
        sections.append("<p class='verdict'>Not validated live yet: <code>kvsim validate --run RUNDIR</code> runs the winner "
                        "beside the presets on the test samples and renders this page again.</p>")
    if trials is not None and trials.height:
        sections += ["<h2>Search: best so far</h2>", _figure(_plot_history(trials, summary["tier"]))]
        if summary["objective"] == "pareto":
            sections += ["<h2>Pareto front</h2>", _figure(_plot_front(trials))]
    sections += _importance_sections(summary)
    if "layer_budgets" in summary:
        curves = summary["layer_budgets"]
        sections += [
            "<h2>Per-layer budgets</h2>",
            f"<p>Each layer's budget relative to a uniform split, on sample <code>{html.escape(curves['sample_id'])}</code>.</p>",
            _figure(_plot_layer_budgets(curves["curves"])),
        ]
    if summary.get("top"):
        sections += ["<h2>Validation re-ranking</h2>", _validation_table(summary)]
    page = "\n".join(["<!doctype html><html><head><meta charset='utf-8'>", f"<title>kvsim search {html.escape(summary['study'])}</title>",
                      f"<style>{STYLE}</style></head><body>", *sections, "</body></html>"])
    write_atomically(run.report_path, lambda tmp: tmp.write_text(page))


def _overview(summary: dict) -> str:
    budget = summary["budget"]
    budget_text = f"{budget[0]}–{budget[1]}" if isinstance(budget, list) else str(budget)
    counts = ", ".join(f"{count} {state}" for state, count in summary["trials"].items())
    samples = summary["samples"]
    storage = html.escape(summary["storage"])
    tier = ("exact tier: the proxy prunes and promotes, the real model scores the answer log-likelihood"
            if summary["tier"] == "exact" else "proxy tier only (sim_score)")
    return (
        f"<p>Objective <b>{summary['objective']}</b> at budget {budget_text}, mode {summary['mode']}, {tier}. "
        f"Traces <code>{html.escape(summary['traces'])}</code>. Trials: {counts}. Samples: {len(samples['search'])} search, "
        f"{len(samples['validation'])} validation (re-ranks the best trials), {len(samples['test'])} test (live, this "
        f"report only).</p><p>Storage <code>{storage}</code>; browse it with <code>optuna-dashboard {storage}</code>"
        f"{' (a journal file: see the README)' if storage.endswith('.journal') else ''}.</p>"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _live_sections(live: pl.DataFrame, winner: str) -> list[str]:
    comparisons = compare_with_presets(live, winner)
    best = against_best_preset(comparisons)
    verdicts = "".join(f"<p class='verdict'>{html.escape(summary_line(c))}.</p>" for c in best.values())
    rows = ["<table><tr><th>budget</th><th>preset</th><th>n</th><th>Δ answer log-lik. [95% CI]</th><th>Δ task score [95% CI]</th>"
            "<th>Δ KL [95% CI]</th><th>winner KV MiB</th><th>preset KV MiB</th><th>verdict</th></tr>"]
    for c in sorted(comparisons, key=lambda c: (c.budget, -c.preset_means["answer_logprob"])):
        cells = "".join(f"<td>{_interval(c.differences[m])}</td>" for m in ("answer_logprob", "score", "kl"))
        rows.append(f"<tr><td>{c.budget}</td><td>{html.escape(c.preset)}</td><td>{c.samples}</td>{cells}"
                    f"<td>{c.winner_kv_mib:.2f}</td><td>{c.preset_kv_mib:.2f}</td><td>{c.verdict}</td></tr>")
    rows.append("</table>")
    return [
        verdicts,
        f"<h2>Live on the test samples: {html.escape(winner)} against {_count(len({c.preset for c in comparisons}), 'preset')} run live</h2>",
        "<p>The presets <code>kvsim validate --policy</code> ran; the validation table below ranks every preset by the exact tier.</p>",
        "<p>Differences are winner − preset on the same samples (positive is better for log-likelihood and task score, "
        "negative for KL), each with a paired 95% bootstrap interval. KV MiB at the serving dtype.</p>",
        _figure(_plot_live(live, winner)),
        "\n".join(rows),
    ]


def _interval(values: tuple[float, float, float]) -> str:
    mean, low, high = values
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _importance_sections(summary: dict) -> list[str]:
    found = summary.get("importances", {})
    sections = ["<h2>Parameter importances</h2>", _importances(found.get("all", "not available: the search has not finished"))]
    family = found.get("winner_family")
    if family:
        sections += [f"<h3>Among the trials with the winner's scorer, {html.escape(family['family'])}</h3>", _importances(family["values"])]
    return sections


def _importances(values: dict | str) -> str:
    if isinstance(values, str):
        return f"<p>{html.escape(values)}</p>"
    names = list(values)[::-1]
    figure, axes = plt.subplots(figsize=(FIGURE_WIDTH, 0.3 * len(names) + 1))
    axes.barh(names, [values[name] for name in names])
    axes.set(xlabel="importance (Optuna's default evaluator, normalized to sum 1)")
    return _figure(figure)


def _validation_table(summary: dict) -> str:
    entries = [(f"top{t['rank']}-{t['name']}", t["validation"], t["search_value"]) for t in summary["top"]]
    entries += [(p["name"], p["validation"], p["search_value"]) for p in summary.get("presets", [])]
    exact = summary["tier"] == "exact"
    entries.sort(key=lambda e: -(e[1]["answer_logprob"] if exact else e[1]["sim_score"]))
    head = "<th>answer log-lik.</th><th>answer match</th><th>KL</th><th>top-1</th>" if exact else ""
    validation = len(summary["samples"]["validation"])
    where = f"the {validation} validation samples" if validation else "the search samples (the split left no validation samples)"
    lines = [f"<p>The best trials and every preset on {where} ({'exact tier' if exact else 'proxy'}); the winner is the first "
             "trial here.</p>",
             f"<table><tr><th>policy</th><th>search value</th>{head}<th>sim_score</th><th>KV MiB</th></tr>"]
    for name, metrics, search_value in entries:
        cells = "".join(f"<td>{metrics[m]:.3f}</td>" for m in ("answer_logprob", "answer_match", "kl", "top1")) if exact else ""
        value = "–" if search_value is None else f"{search_value:.3f}"
        lines.append(f"<tr><td>{html.escape(name)}</td><td>{value}</td>{cells}<td>{metrics['sim_score']:.3f}</td>"
                     f"<td>{metrics['kv_mib']:.2f}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _figure(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _plot_history(trials: pl.DataFrame, tier: str) -> plt.Figure:
    """Top: the objective of complete trials and the best so far; bottom: every trial's proxy mean."""
    figure, (value_axes, proxy_axes) = plt.subplots(2, 1, figsize=(FIGURE_WIDTH, 6), sharex=True)
    complete = trials.filter(pl.col("state") == TrialState.COMPLETE.name).sort("number")
    label = "answer log-likelihood (search samples)" if tier == "exact" else "sim_score (search samples)"
    value_axes.scatter(complete["number"], complete["value"], s=12, label="complete")
    if complete.height:
        value_axes.step(complete["number"], complete["value"].cum_max(), where="post", color="black", label="best so far")
    value_axes.set(ylabel=label)
    value_axes.legend(loc="lower right")
    scored = trials.filter(pl.col("sim_score").is_not_null())
    promoted = scored.filter(pl.col("state") == TrialState.COMPLETE.name)
    proxy_axes.scatter(scored["number"], scored["sim_score"], marker="x", color="0.6", s=12, label="proxy (pruned or not promoted)")
    proxy_axes.scatter(promoted["number"], promoted["sim_score"], s=12, label="promoted to the exact tier" if tier == "exact" else "complete")
    proxy_axes.set(xlabel="trial", ylabel="proxy sim_score")
    proxy_axes.legend(loc="lower right", fontsize=8)
    return figure


def _plot_front(trials: pl.DataFrame) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(FIGURE_WIDTH, 4.5))
    complete = trials.filter(pl.col("state") == TrialState.COMPLETE.name).sort("kv_mib")
    axes.scatter(complete["kv_mib"], complete["value"], s=12, color="0.6", label="trials")
    front = complete.filter(pl.col("value") > pl.col("value").shift(1).cum_max().fill_null(float("-inf")))
    axes.plot(front["kv_mib"], front["value"], marker="o", color="black", label="Pareto front")
    axes.set(xlabel="KV MiB per sample", ylabel="value (search samples)")
    axes.legend(loc="lower right")
    return figure


def _plot_layer_budgets(curves: dict[str, list[float]]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(FIGURE_WIDTH, 4))
    for index, (name, relative) in enumerate(curves.items()):
        style = {"color": "black", "linewidth": 2.5} if index == 0 else {"linewidth": 1, "alpha": 0.8}
        axes.plot(range(len(relative)), relative, label=name + (" (winner)" if index == 0 else ""), **style)
    axes.axhline(1.0, color="0.8", linestyle=":")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="layer", ylabel="layer budget / uniform")
    axes.legend(fontsize=8, ncols=2)
    return figure


def _plot_live(live: pl.DataFrame, winner: str) -> plt.Figure:
    """Mean answer log-likelihood and task score per policy, one row of panels per budget."""
    budgets = sorted(set(live["budget"]))
    figure, axes = plt.subplots(len(budgets), 2, figsize=(FIGURE_WIDTH, 0.28 * live["policy"].n_unique() * len(budgets) + 1.5),
                                squeeze=False, sharey="row")
    for row, budget in enumerate(budgets):
        means = (live.filter(pl.col("budget") == budget).group_by("policy")
                 .agg(pl.col("answer_logprob").mean(), pl.col("score").mean()).sort("answer_logprob", descending=True))
        colors = ["tab:orange" if p == winner else "0.5" if p == "full" else "tab:blue" for p in means["policy"]]
        for column, metric in enumerate(("answer_logprob", "score")):
            axes[row][column].barh(means["policy"], means[metric], color=colors)
            axes[row][column].set(xlabel=f"{metric.replace('_', ' ')} (mean), budget {budget}")
        axes[row][0].invert_yaxis()
    figure.suptitle("Winner (orange), presets (blue) and the full cache (grey), live on the test samples")
    figure.tight_layout()
    return figure
