"""Validate a search run's winners live: read RUNDIR/search.json, run the top policies beside the
presets on the held-out samples, and add the table and a plot to the run's report.html.

search.json's layout is documented in `kvsim.search`; this module reads only `traces`, `mode`,
`samples.held_out` and `top[*].spec` / `top[*].budget`.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from kvsim.errors import KvsimError  # noqa: E402
from kvsim.live.fidelity import html_table  # noqa: E402
from kvsim.live.validate import summarize_validation  # noqa: E402
from kvsim.paths import read_json, write_atomically  # noqa: E402
from kvsim.policies.budget import Budget  # noqa: E402
from kvsim.policies.policy import Policy, load_policy_spec  # noqa: E402

TABLE_COLUMNS = ["policy", "budget", "samples", "sim_score", "score", "kl", "top1", "kv_bytes", "decode_ms_per_token"]
SECTION = re.compile(r"<!-- kvsim:validation -->.*<!-- /kvsim:validation -->", re.S)


@dataclass
class SearchRun:
    rundir: Path
    study: str
    traces: Path
    mode: str
    held_out: list[str]
    winners: list[tuple[Policy, Budget]]  # best first, renamed top1-…, top2-…
    top_entries: list[dict]  # search.json's entries for them (sim_score, provenance, kv_mib)


def read_search_run(rundir: Path, top: int) -> SearchRun:
    path = rundir / "search.json"
    if not path.is_file():
        raise KvsimError(f"{rundir} is not a search run (no {path.name}): run `kvsim search --out {rundir}` first")
    summary = read_json(path, "search summary", "re-run the search")
    entries = summary.get("top") or []
    if not entries:
        raise KvsimError(f"{path} lists no finished trials: let the search complete some trials first")
    winners = []
    for entry in entries[:top]:
        policy = load_policy_spec(rundir / entry["spec"])
        winners.append((replace(policy, name=f"top{entry['rank']}-{policy.name}"), Budget(entry["budget"])))
    held_out = summary["samples"]["held_out"]
    if not held_out:
        # Validating on the search samples would report the winners on the samples that chose them.
        raise KvsimError(
            f"{rundir} has no held-out samples to validate on: search again with --held-out above 0 and at least "
            "two samples per task, or run `kvsim validate --traces ... --policy ...` on samples of your choice"
        )
    return SearchRun(rundir, summary["study"], Path(summary["traces"]), summary["mode"], list(held_out), winners, entries[:top])


def with_presets(run: SearchRun, presets: list[Policy]) -> list[tuple[Policy, Budget]]:
    """The winners, then each preset at every budget a winner was found at."""
    budgets = list(dict.fromkeys(budget for _, budget in run.winners))
    return run.winners + [(preset, budget) for budget in budgets for preset in presets]


def add_to_report(rundir: Path, table: pl.DataFrame) -> Path:
    """Put (or replace) a live-validation section with a plot and the table in RUNDIR/report.html."""
    summary = summarize_validation(table)
    figure = _plot(summary)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()
    section = (
        "<!-- kvsim:validation --><h2>Live validation on held-out samples</h2>"
        f"<img src='data:image/png;base64,{image}' alt='live validation'>{html_table(summary.select(TABLE_COLUMNS))}<!-- /kvsim:validation -->"
    )
    report = rundir / "report.html"
    page = report.read_text() if report.is_file() else "<!doctype html><html><body></body></html>"
    page = SECTION.sub(lambda _: section, page) if SECTION.search(page) else page.replace("</body>", section + "</body>")
    write_atomically(report, lambda tmp: Path(tmp).write_text(page))
    return report


def _plot(summary: pl.DataFrame) -> plt.Figure:
    ordered = summary.sort("score", "top1", descending=True)
    labels = [f"{p} @ {b}" for p, b in zip(ordered["policy"], ordered["budget"])]
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(labels) + 1.5), sharey=True)
    colors = ["tab:orange" if label.startswith("top") else "tab:blue" for label in labels]
    axes[0].barh(labels, ordered["score"], color=colors)
    axes[0].set_xlabel("live task score (mean)")
    axes[1].barh(labels, ordered["top1"], color=colors)
    axes[1].set_xlabel("top-1 agreement with the full cache")
    axes[0].invert_yaxis()
    figure.suptitle("Searched winners (orange) and presets, live on held-out samples")
    figure.tight_layout()
    return figure
