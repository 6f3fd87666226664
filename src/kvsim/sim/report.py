"""A simulation report people can look at: a leaderboard per mode and budget, and two plots.

Written as Markdown with PNG figures beside it, so it renders on any code host and in editors.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from kvsim.paths import write_atomically  # noqa: E402
from kvsim.sim.simulate import ORACLE, Simulation  # noqa: E402


def leaderboard(samples: pl.DataFrame) -> pl.DataFrame:
    """Mean metrics per (mode, budget, policy), best sim_score first within each budget."""
    return (
        samples.group_by("mode", "budget", "policy")
        .agg(
            pl.col("sim_score").mean(),
            pl.col("attn_recall").mean(),
            pl.col("out_err").mean(),
            pl.col("evidence_recall").mean(),
            pl.col("kv_bytes").mean(),
            pl.len().alias("samples"),
        )
        .sort("mode", "budget", "sim_score", descending=[False, False, True])
    )


def write_report(simulation: Simulation, path: Path, title: str) -> Path:
    """Write `path` (Markdown) and its figures `<stem>.*.png`; returns the report path."""
    board = leaderboard(simulation.samples)
    score_plot = path.with_name(f"{path.stem}.sim_score.png")
    layer_plot = path.with_name(f"{path.stem}.layer_recall.png")
    _plot_scores(board, score_plot)
    _plot_layer_recall(simulation.layers, layer_plot)
    lines = [f"# {title}", "", f"![sim_score by budget]({score_plot.name})", "", f"![attention recall by layer]({layer_plot.name})", ""]
    for (mode, budget), group in board.group_by("mode", "budget", maintain_order=True):
        lines += [f"## {mode}, budget {budget}", "", "| policy | sim_score | attn recall | out err | evidence | KV MiB | samples |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in group.iter_rows(named=True):
            evidence = "–" if row["evidence_recall"] is None else f"{row['evidence_recall']:.3f}"
            lines.append(
                f"| {row['policy']} | {row['sim_score']:.3f} | {row['attn_recall']:.3f} | {row['out_err']:.3f} | "
                f"{evidence} | {row['kv_bytes'] / 2**20:.2f} | {row['samples']} |"
            )
        lines.append("")
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines)))
    return path


def _plot_scores(board: pl.DataFrame, path: Path) -> None:
    modes = board["mode"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        rows = board.filter(pl.col("mode") == mode)
        budgets = sorted(rows["budget"].unique().to_list(), key=_budget_order)
        for policy in sorted(rows["policy"].unique().to_list()):
            points = rows.filter(pl.col("policy") == policy)
            scores = [points.filter(pl.col("budget") == b)["sim_score"].mean() for b in budgets]
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if policy == ORACLE else {}
            axis.plot(budgets, scores, marker="o", label=policy, **style)
        axis.set(title=mode, xlabel="budget", ylabel="sim_score (share of attention output preserved)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    _save(figure, path)


def _plot_layer_recall(layers: pl.DataFrame, path: Path) -> None:
    """Attention recall per layer at the smallest budget: where each policy loses attention."""
    budget = min(layers["budget"].unique().to_list(), key=_budget_order)
    rows = layers.filter(pl.col("budget") == budget).group_by("policy", "layer").agg(pl.col("attn_recall").mean())
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for policy in sorted(rows["policy"].unique().to_list()):
        points = rows.filter(pl.col("policy") == policy).sort("layer")
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if policy == ORACLE else {}
        axis.plot(points["layer"], points["attn_recall"], label=policy, **style)
    axis.set(title=f"attention recall by layer, budget {budget}", xlabel="layer", ylabel="attention recall")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def _budget_order(label: str) -> tuple[int, float]:
    """Fractions before token counts, each ascending ('0.05' < '0.2' < '64tok')."""
    return (1, float(label.removesuffix("tok"))) if label.endswith("tok") else (0, float(label))
