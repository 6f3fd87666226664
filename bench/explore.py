"""Benchmark: does a long search keep finding better policies, or is it flat after the presets?

Issue 11 asks that 200 trials explore the composed space: a best-so-far curve that stops rising
once the enqueued presets have run means the space (or the sampler) adds nothing. One
`kvsim.search.search` of --trials trials (prefill-only, exact tier: the proxy screens within a
scorer family, the model ranks by the answer's log-likelihood on the search samples), then from
its trials table:

- the best-so-far curve of the objective over trial numbers, against the best enqueued preset;
- every trial that raised the best, with the policy it was (scorer, allocator, schedule, retention)
  and where it came from (an enqueued preset, the local step around the best preset, the sampler);
- the best after 15, 50, 100 and all trials, and the last improvement's trial number;
- the search's own verdict on its validation samples (the winner against the best preset there).

Search-sample values choose; they are not a test (bench/quality.py tests on a held-out workload).

Run: `PYTHONPATH=src .venv/bin/python bench/explore.py --traces runs/quality/search-default-s0`
(any TraceSet; bench/quality.py captures this one). Results: bench/results/explore.md|json|png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import optuna
import polars as pl
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.policies import Budget
from kvsim.search import SearchSettings, search
from kvsim.search.outputs import trials_table

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = (15, 50, 100)


def best_so_far(trials: pl.DataFrame) -> pl.DataFrame:
    """Complete trials in trial order with the running best of their objective."""
    complete = trials.filter(pl.col("state") == "COMPLETE").sort("number")
    return complete.with_columns(pl.col("value").cum_max().alias("best"))


def describe(spec: str) -> str:
    """One line per policy: each part's name and its parameters."""
    policy = json.loads(spec)
    parts = []
    for kind in ("scorer", "allocator", "schedule", "retention"):
        part = dict(policy[kind])
        name = part.pop("name")
        parts.append(f"{name}({', '.join(f'{k}={v}' for k, v in part.items())})" if part else name)
    return " · ".join(parts)


def improvements(curve: pl.DataFrame) -> list[dict]:
    """The trials that raised the best so far (the first complete trial included)."""
    out, best = [], float("-inf")
    for row in curve.iter_rows(named=True):
        if row["value"] > best:
            best = row["value"]
            origin = row["preset"] or (f"neighbour of {row['neighbour_of']}" if row["neighbour_of"] is not None else "sampled")
            out.append({"trial": row["number"], "value": row["value"], "origin": origin, "policy": describe(row["policy"])})
    return out


def plot(path: Path, trials: pl.DataFrame, curve: pl.DataFrame, best_preset: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    pruned = trials.filter(pl.col("state") == "PRUNED")
    presets = curve.filter(pl.col("preset").is_not_null())
    moves = curve.filter(pl.col("neighbour_of").is_not_null())
    sampled = curve.filter(pl.col("preset").is_null() & pl.col("neighbour_of").is_null())
    ax.scatter(sampled["number"], sampled["value"], s=12, color="tab:blue", label="sampled composition")
    ax.scatter(presets["number"], presets["value"], s=18, marker="s", color="tab:orange", label="enqueued preset")
    ax.scatter(moves["number"], moves["value"], s=22, marker="^", color="tab:green", label="local step (best preset's neighbour)")
    ax.scatter(pruned["number"], pruned["value"], s=8, color="lightgray", label="pruned (running value)")
    ax.step(curve["number"], curve["best"], where="post", color="black", linewidth=1.8, label="best so far")
    ax.axhline(best_preset, color="tab:orange", linestyle="--", linewidth=1, label="best preset")
    # Near the best preset, where the search has to win; weak trials fall below the axis.
    ax.set_ylim(best_preset - 0.6, float(curve["best"].max()) + 0.1)
    ax.set_xlabel("trial")
    ax.set_ylabel("answer log-likelihood (search samples)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, result: dict) -> None:
    s, checkpoints = result["settings"], result["checkpoints"]
    lines = [
        f"# Exploration: the best-so-far curve of a {s['trials']}-trial search",
        "",
        f"Command: `{result['command']}`. Wall time {result['wall_s'] / 60:.1f} min{' (reading a finished run)' if s.get('existing') else ''}; load average at start/end "
        f"{result['machine']['load_average']['start'][0]:.2f} / {result['machine']['load_average']['end'][0]:.2f} on "
        f"{result['machine']['cpu_count']} cores.",
        "",
        f"TraceSet `{s['traces']}`, {s['mode']}, budget {s['budget']:g}, prefill-only space, {s['workers']} workers, "
        f"{len(result['samples']['search'])} search and {len(result['samples']['validation'])} validation samples. Objective: the "
        "exact tier's answer log-likelihood on the search samples (higher is better); presets are enqueued first.",
        "",
        f"- Trials: {result['trials']['complete']} complete, {result['trials']['pruned']} pruned.",
        f"- Best preset on the search samples: **{result['best_preset']['name']}** {result['best_preset']['value']:.3f}.",
        "- Best so far after " + ", ".join(f"{n} trials: {v:.3f}" for n, v in checkpoints.items())
        + f"; after all: **{result['best']:.3f}** ({result['best'] - result['best_preset']['value']:+.3f} over the best preset).",
        f"- Improvements of the best: {len(result['improvements'])}, the last at trial {result['improvements'][-1]['trial']}; "
        f"{sum(1 for i in result['improvements'] if i['trial'] >= 50)} of them at trial 50 or later.",
        f"- Validation (the search's re-ranking, {len(result['samples']['validation'])} samples): {result['validation_line']}",
        "",
        "![best so far](explore.png)",
        "",
        "## Trials that raised the best",
        "",
        "| trial | answer log-lik. | origin | policy |",
        "|---|---|---|---|",
        *(f"| {i['trial']} | {i['value']:.3f} | {i['origin']} | {i['policy']} |" for i in result["improvements"]),
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", help="the TraceSet to search (not with --existing)")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--mode", default="query-agnostic")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--validation", type=float, default=0.34)
    parser.add_argument("--rundir", default="runs/explore")
    parser.add_argument("--existing", action="store_true", help="read the finished search in --rundir instead of running one")
    args = parser.parse_args()
    load_at_start, started = os.getloadavg(), time.perf_counter()
    rundir = Path(args.rundir)
    if args.existing:
        summary = json.loads((rundir / "search.json").read_text())
        args.traces, args.budget, args.mode = summary["traces"], summary["budget"], summary["mode"]
        args.trials, args.workers = sum(summary["trials"].values()), summary["settings"]["workers"]
    else:
        settings = SearchSettings(traces=Path(args.traces), budget=Budget(args.budget), rundir=rundir, trials=args.trials, workers=args.workers,
                                  prefill_only=True, study=f"explore-{args.mode}-{args.budget:g}", mode=args.mode, validation=args.validation, test=0.0)
        summary = search(settings).summary()
    # From the study itself, with this version's columns (a run folder of an older kvsim lacks some).
    storage = JournalStorage(JournalFileBackend(summary["storage"])) if summary["storage"].endswith(".journal") else summary["storage"]
    trials = trials_table(optuna.load_study(study_name=summary["study"], storage=storage))
    curve = best_so_far(trials)
    presets = curve.filter(pl.col("preset").is_not_null()).sort("value", descending=True)
    best_preset = {"name": presets["preset"][0], "value": presets["value"][0]}
    result = {
        "command": "PYTHONPATH=src python bench/explore.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args)},
        "wall_s": time.perf_counter() - started,
        "samples": summary["samples"],
        "trials": summary["trials"],
        "best_preset": best_preset,
        "best": float(curve["best"].max()),
        "checkpoints": {n: float(curve.filter(pl.col("number") < n)["best"].max()) for n in CHECKPOINTS if n < len(trials) and (curve["number"] < n).any()},
        "improvements": improvements(curve),
        "validation_line": validation_line(summary),
        "winner": summary["top"][0],
        "machine": machine_info(load_at_start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "explore.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(RESULTS / "explore.png", trials, curve, best_preset["value"], f"{args.mode}, budget {args.budget:g}: {args.trials} trials (weaker than best preset − 0.6 below the axis)")
    write_markdown(RESULTS / "explore.md", result)
    print((RESULTS / "explore.md").read_text())


def validation_line(summary: dict) -> str:
    """The winner and the best preset (the full cache is not one) by answer log-likelihood on the validation samples."""
    winner = summary["top"][0]
    preset = max((p for p in summary["presets"] if p["name"] != "full"), key=lambda p: p["validation"]["answer_logprob"])
    return (f"winner `{winner['name']}` {winner['validation']['answer_logprob']:.3f} against the best preset there, "
            f"`{preset['name']}`, {preset['validation']['answer_logprob']:.3f}")


if __name__ == "__main__":
    main()
