"""How well the simulator predicts the live model: rank correlations between simulated and live
metrics over many (policy, budget) pairs, with a scatter plot.

Correlations are taken over pair means (each pair averaged over the same samples), because search
ranks policies, not single samples; per-row correlations are reported beside them. Live KL and
out_err are "lower is better", so their correlations with sim_score are expected to be negative.
"""

from __future__ import annotations

import html
from io import StringIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from scipy import stats  # noqa: E402

from kvsim.paths import write_atomically  # noqa: E402

SIM_METRICS = ("sim_score", "sim_attn_recall", "sim_out_err")
LIVE_METRICS = ("score", "kl", "top1")


def pair_means(table: pl.DataFrame) -> pl.DataFrame:
    return table.group_by("mode", "policy", "budget", maintain_order=True).agg(
        pl.len().alias("samples"), *(pl.col(c).mean() for c in (*SIM_METRICS, *LIVE_METRICS))
    )


def correlations(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (level, simulated metric, live metric): Spearman and Kendall with p-values."""
    rows = []
    for level, frame in (("pairs", pair_means(table)), ("rows", table)):
        for sim in SIM_METRICS:
            for live in LIVE_METRICS:
                x, y = frame[sim].to_numpy(), frame[live].to_numpy()
                constant = len(set(x)) < 2 or len(set(y)) < 2
                spearman = stats.spearmanr(x, y) if not constant else None
                kendall = stats.kendalltau(x, y) if not constant else None
                rows.append(
                    {
                        "level": level,
                        "simulated": sim,
                        "live": live,
                        "n": frame.height,
                        "spearman": None if constant else float(spearman.statistic),
                        "spearman_p": None if constant else float(spearman.pvalue),
                        "kendall": None if constant else float(kendall.statistic),
                        "kendall_p": None if constant else float(kendall.pvalue),
                    }
                )
    return pl.DataFrame(rows)


def scatter(table: pl.DataFrame) -> plt.Figure:
    """sim_score against each live metric, one point per (policy, budget), labelled by policy."""
    means = pair_means(table)
    figure, axes = plt.subplots(1, len(LIVE_METRICS), figsize=(5 * len(LIVE_METRICS), 4.2))
    for axis, live in zip(axes, LIVE_METRICS):
        for budget in sorted(set(means["budget"])):
            part = means.filter(pl.col("budget") == budget)
            axis.scatter(part["sim_score"], part[live], label=f"budget {budget}", alpha=0.8)
            for row in part.iter_rows(named=True):
                axis.annotate(row["policy"], (row["sim_score"], row[live]), fontsize=7, alpha=0.7)
        axis.set_xlabel("sim_score (simulated)")
        axis.set_ylabel(f"live {live}")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Simulator vs live model, one point per (policy, budget)")
    figure.tight_layout()
    return figure


def write_fidelity_report(table: pl.DataFrame, out: Path) -> dict[str, Path]:
    """fidelity.parquet (every live run), correlations.csv, fidelity.png and fidelity.html in `out`."""
    found = correlations(table)
    paths = {name: out / name for name in ("fidelity.parquet", "correlations.csv", "fidelity.png", "fidelity.html")}
    write_atomically(paths["fidelity.parquet"], table.write_parquet)
    write_atomically(paths["correlations.csv"], found.write_csv)
    figure = scatter(table)
    write_atomically(paths["fidelity.png"], lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    svg = StringIO()
    figure.savefig(svg, format="svg")
    plt.close(figure)
    page = _page(found, pair_means(table), svg.getvalue())
    write_atomically(paths["fidelity.html"], lambda tmp: Path(tmp).write_text(page))
    return paths


def html_table(frame: pl.DataFrame) -> str:
    """A plain HTML table of `frame`, floats to 4 significant digits (also used by the search report)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(found: pl.DataFrame, means: pl.DataFrame, svg: str) -> str:
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kvsim fidelity</title><style>{style}</style></head><body>"
        f"<h1>Simulator fidelity</h1>{svg[svg.index('<svg'):]}"
        f"<h2>Rank correlations</h2>{html_table(found)}<h2>Pair means</h2>{html_table(means)}</body></html>"
    )


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
