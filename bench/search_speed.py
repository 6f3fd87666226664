"""Benchmark: how fast `kvsim search` runs trials, and how fast it reaches a good policy.

Three studies of the same size on the same TraceSet and budget, one after the other in one run:

1. TPE (the default sampler) with 1 worker;
2. TPE with 2 local workers (the journal-file storage);
3. random search with 2 workers, the baseline a model-based sampler must beat.

Each is a whole `kvsim.search.search` call (preparing samples, the trials, scoring the winners and
presets on the held-out samples, the report): *wall s*. *Trials s* is the span from the first
trial's start to the last trial's end, and trials/s is computed on it. *Samples/trial* is the mean
number of search samples a trial scored (pruned trials stop early). *Time to q* is the time from the
first trial's start until the study's best value first reached q, where q is the lower of the
final best values of TPE (2 workers) and random search, so both reach it, and also 99 % of it.

The issue's target: a 500-trial study on 32 samples within 10 minutes on 2 cores.

Run: `.venv/bin/python bench/search_speed.py --traces runs/default32/traces` (capture 32 samples
first: `kvsim capture --samples 32 --out runs/default32/traces`, ~8 min); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from rich.console import Console

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.policies import Budget
from kvsim.search import SearchSettings, search

RESULTS = Path(__file__).parent / "results"
TARGET_TRIALS, TARGET_SAMPLES, TARGET_S = 500, 32, 600.0  # trials, samples in the TraceSet, seconds
STUDIES = [("tpe", 1), ("tpe", 2), ("random", 2)]
SCHEDULES = ("prefill", "every_step", "lagged")


def run_study(traces: Path, rundir: Path, sampler: str, workers: int, trials: int, budget: float, held_out: float) -> dict:
    """The proxy tier alone: this bench measures the simulator's throughput (the exact tier runs the model)."""
    settings = SearchSettings(traces=traces, budget=Budget(budget), rundir=rundir, study=f"{sampler}-{workers}", trials=trials,
                              sampler=sampler, workers=workers, validation=held_out, test=0.0, tier="proxy")
    start = time.perf_counter()
    summary = search(settings).summary()
    wall = time.perf_counter() - start
    storage = f"sqlite:///{rundir / 'study.db'}" if workers == 1 else JournalStorage(JournalFileBackend(str(rundir / "study.journal")))
    study = optuna.load_study(study_name=settings.study, storage=storage)
    finished = [t for t in study.trials if t.datetime_complete is not None]
    origin = min(t.datetime_start for t in finished)
    timeline, best = [], float("-inf")
    for trial in sorted(finished, key=lambda t: t.datetime_complete):
        if trial.state == TrialState.COMPLETE:
            best = max(best, trial.value)
        timeline.append(((trial.datetime_complete - origin).total_seconds(), best))
    search_samples = len(summary["samples"]["search"])
    seen = [t.last_step if t.state == TrialState.PRUNED else search_samples for t in finished if t.state != TrialState.FAIL]
    span = timeline[-1][0]
    # Where trial time goes: prefill-once policies replay in one block, the others token by token.
    by_schedule: dict[str, float] = {}
    for trial in finished:
        schedule = trial.user_attrs.get("policy", {}).get("schedule", {}).get("name", "none")
        by_schedule[schedule] = by_schedule.get(schedule, 0.0) + trial.duration.total_seconds()
    return {
        "sampler": sampler,
        "workers": workers,
        "trials": len(finished),
        "states": {state.name.lower(): sum(t.state == state for t in finished) for state in TrialState if any(t.state == state for t in finished)},
        "wall_s": wall,
        "trials_s": span,
        "trials_per_s": len(finished) / span,
        "samples_per_trial": sum(s or 0 for s in seen) / len(seen),
        "search_samples": search_samples,
        "best": best,
        "trial_s_by_schedule": by_schedule,
        "timeline": timeline,
        "top": summary["top"][0] if summary["top"] else None,
    }


def time_to(timeline: list[tuple[float, float]], quality: float) -> float | None:
    return next((seconds for seconds, best in timeline if best >= quality), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=Path("runs/default32/traces"))
    parser.add_argument("--trials", type=int, default=TARGET_TRIALS)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--held-out", type=float, default=0.25)
    args = parser.parse_args()
    console = Console()
    load_at_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvsim-search-bench-") as scratch:
        for sampler, workers in STUDIES:
            console.print(f"[bold]{sampler}, {workers} worker(s), {args.trials} trials[/]")
            result = run_study(args.traces, Path(scratch) / f"{sampler}-{workers}", sampler, workers, args.trials, args.budget, args.held_out)
            console.print({k: v for k, v in result.items() if k != "timeline"})
            results.append(result)
    tpe2 = next(r for r in results if r["sampler"] == "tpe" and r["workers"] == 2)
    random2 = next(r for r in results if r["sampler"] == "random")
    quality = min(tpe2["best"], random2["best"])
    for result in results:
        result["time_to_q_s"] = time_to(result["timeline"], quality)
        result["time_to_99pct_q_s"] = time_to(result["timeline"], 0.99 * quality)
    report = {
        "machine": machine_info(load_at_start),
        "settings": {"traces": str(args.traces.resolve()), "trials": args.trials, "budget": args.budget, "held_out": args.held_out},
        "quality_q": quality,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "search_speed.md").write_text(markdown(report))
    console.print(markdown(report))


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    results = report["results"]
    samples = results[0]["search_samples"]
    lines = [
        "# Search speed benchmark",
        "",
        f"`bench/search_speed.py`: three `kvsim search` studies of {settings['trials']} trials each, one after the other, on "
        f"`{settings['traces']}` ({samples} search samples, held-out share {settings['held_out']}), budget {settings['budget']}, "
        f"mode query-aware; {machine['cpu_count']} CPUs, 1-minute load average {machine['load_average']['start'][0]:.1f} at start, "
        f"{machine['load_average']['end'][0]:.1f} at end. q = {report['quality_q']:.4f} (the lower final best of TPE and random with 2 workers).",
        "",
        "| sampler | workers | trials | complete / pruned / failed | wall s | trials s | trials/s | samples/trial | best sim_score | time to q s | time to 0.99 q s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        states = r["states"]
        counts = f"{states.get('complete', 0)} / {states.get('pruned', 0)} / {states.get('fail', 0)}"
        to_q = "–" if r["time_to_q_s"] is None else f"{r['time_to_q_s']:.0f}"
        to_99 = "–" if r["time_to_99pct_q_s"] is None else f"{r['time_to_99pct_q_s']:.0f}"
        lines.append(
            f"| {r['sampler']} | {r['workers']} | {r['trials']} | {counts} | {r['wall_s']:.0f} | {r['trials_s']:.0f} | "
            f"{r['trials_per_s']:.2f} | {r['samples_per_trial']:.1f} | {r['best']:.4f} | {to_q} | {to_99} |"
        )
    lines += ["", "Worker-seconds of trials by the policy's schedule (every-step and lagged policies replay token by token):", "",
              "| sampler | workers | " + " | ".join(SCHEDULES) + " |", "|---|---:|" + "---:|" * len(SCHEDULES)]
    for r in results:
        total = sum(r["trial_s_by_schedule"].values())
        shares = [f"{r['trial_s_by_schedule'].get(name, 0.0):.0f} ({r['trial_s_by_schedule'].get(name, 0.0) / total:.0%})" for name in SCHEDULES]
        lines.append(f"| {r['sampler']} | {r['workers']} | " + " | ".join(shares) + " |")
    one, two = results[0], results[1]
    estimate = two["wall_s"] - two["trials_s"] + TARGET_TRIALS / two["trials_per_s"]
    lines += [
        "",
        "## Conclusion",
        "",
        f"2 workers run {two['trials_per_s'] / one['trials_per_s']:.2f}× the trials per second of 1 worker "
        f"({two['trials_per_s']:.2f} vs {one['trials_per_s']:.2f}).",
        f"A {TARGET_TRIALS}-trial study with 2 workers on these traces: ~{estimate:.0f} s "
        f"({'measured' if settings['trials'] == TARGET_TRIALS else 'the measured setup and reporting time plus 500 trials at the measured rate'}); "
        f"target {TARGET_S:.0f} s on {TARGET_SAMPLES} samples: {'met' if estimate <= TARGET_S else 'not met'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
