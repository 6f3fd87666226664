"""Benchmark: how many trials `kvsim search` runs in the issue's 10 minutes, and how fast it reaches a good policy.

Studies on the same TraceSet and budget, one after the other in one run, each a whole
`kvsim.search.search` call stopped by `--time-limit` (no trial starts after it) or at the trial count,
whichever comes first:

1. TPE (the default sampler), 2 local workers, the proxy tier (the simulator alone);
2. random search, 2 workers, proxy tier: the baseline a model-based sampler must beat;
3. TPE, 2 workers, the exact tier (the model scores what the proxy promotes): its evaluations per
   second, beside the proxy's.

*Trials* are those finished within the limit; *trials/s* is computed on the span from the first
trial's start to the last trial's end; *to 500* is the time the study's setup plus 500 trials take
at that rate (the measured time when 500 finished). *Samples/trial* is the mean number of search
samples a trial scored (pruned trials stop early). *Time to q*: from the first trial's start until
the study's best value first reached q, the lower of the final best values of the two proxy studies,
so both reach it (also 99 % of it).

The issue's target: a 500-trial study on 32 samples within 10 minutes on 2 cores with 2 workers.

Run: `.venv/bin/python bench/search_speed.py --traces runs/default32/traces` (capture 32 samples
first: `kvsim capture --samples 32 --mode query-aware --out runs/default32/traces`, ~8 min); results
go to bench/results/.
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
# (sampler, workers, tier, share of --minutes): the exact tier runs the model, so a short look suffices for its rate.
STUDIES = [("tpe", 2, "proxy", 1.0), ("random", 2, "proxy", 1.0), ("tpe", 2, "exact", 0.4)]
SCHEDULES = ("prefill", "every_step", "lagged")


def run_study(traces: Path, rundir: Path, sampler: str, workers: int, tier: str, trials: int, seconds: float, budget: float,
              held_out: float) -> dict:
    settings = SearchSettings(traces=traces, budget=Budget(budget), rundir=rundir, study=f"{sampler}-{workers}-{tier}", trials=trials,
                              sampler=sampler, workers=workers, validation=held_out, test=0.0, tier=tier, time_limit_s=seconds)
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
    exact = [t for t in finished if t.user_attrs.get("tier") == "exact"]
    return {
        "sampler": sampler,
        "workers": workers,
        "tier": tier,
        "limit_s": seconds,
        "trials": len(finished),
        # Samples the model scored: a pruned exact trial stops at its last reported step.
        "exact_evaluations": sum(t.last_step or 0 for t in exact),
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
    parser.add_argument("--minutes", type=float, default=TARGET_S / 60, help="time limit of the proxy studies (the exact one gets 0.4 of it)")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--held-out", type=float, default=0.0, help="share of the samples kept for re-ranking (0: every trial runs on all of them)")
    args = parser.parse_args()
    console = Console()
    load_at_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvsim-search-bench-") as scratch:
        for sampler, workers, tier, share in STUDIES:
            seconds = 60 * args.minutes * share
            console.print(f"[bold]{sampler}, {workers} worker(s), {tier} tier: {args.trials} trials or {seconds:.0f} s[/]")
            result = run_study(args.traces, Path(scratch) / f"{sampler}-{workers}-{tier}", sampler, workers, tier, args.trials, seconds,
                               args.budget, args.held_out)
            console.print({k: v for k, v in result.items() if k != "timeline"})
            results.append(result)
    proxies = [r for r in results if r["tier"] == "proxy"]
    quality = min(r["best"] for r in proxies)
    for result in proxies:
        result["time_to_q_s"] = time_to(result["timeline"], quality)
        result["time_to_99pct_q_s"] = time_to(result["timeline"], 0.99 * quality)
    report = {
        "machine": machine_info(load_at_start),
        "settings": {"traces": str(args.traces.resolve()), "trials": args.trials, "minutes": args.minutes, "budget": args.budget,
                     "held_out": args.held_out},
        "quality_q": quality,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "search_speed.md").write_text(markdown(report))
    console.print(markdown(report))


def to_target(result: dict) -> float:
    """Seconds a 500-trial study takes: measured when it finished them, else its setup and reporting time plus 500 trials at its rate."""
    return result["wall_s"] - result["trials_s"] + TARGET_TRIALS / result["trials_per_s"]


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    results = report["results"]
    samples = results[0]["search_samples"]
    lines = [
        "# Search speed benchmark",
        "",
        f"`bench/search_speed.py`: `kvsim search` studies of at most {settings['trials']} trials, each stopped after "
        f"{settings['minutes']:g} min of trials (the exact-tier study after {0.4 * settings['minutes']:g}), one after the other, on "
        f"`{settings['traces']}` ({samples} search samples, held-out share {settings['held_out']}), budget {settings['budget']}, "
        f"mode query-aware, the whole policy space (stepwise schedules included); {machine['cpu_count']} CPUs, 1-minute load average "
        f"{machine['load_average']['start'][0]:.1f} at start, {machine['load_average']['end'][0]:.1f} at end. "
        f"q = {report['quality_q']:.4f} (the lower final best sim_score of the two proxy studies).",
        "",
        "| sampler | workers | tier | trials in limit | complete / pruned / failed | wall s | trials s | trials/s | to 500 s | samples/trial "
        "| model evaluations/s | best | time to q s | time to 0.99 q s |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        states = r["states"]
        counts = f"{states.get('complete', 0)} / {states.get('pruned', 0)} / {states.get('fail', 0)}"
        to_q = "–" if r.get("time_to_q_s") is None else f"{r['time_to_q_s']:.0f}"
        to_99 = "–" if r.get("time_to_99pct_q_s") is None else f"{r['time_to_99pct_q_s']:.0f}"
        evaluations = "–" if r["tier"] == "proxy" else f"{r['exact_evaluations'] / r['trials_s']:.2f}"
        lines.append(
            f"| {r['sampler']} | {r['workers']} | {r['tier']} | {r['trials']} | {counts} | {r['wall_s']:.0f} | {r['trials_s']:.0f} | "
            f"{r['trials_per_s']:.2f} | {to_target(r):.0f} | {r['samples_per_trial']:.1f} | {evaluations} | {r['best']:.4f} | {to_q} | {to_99} |"
        )
    lines += ["", "Worker-seconds of trials by the policy's schedule (every-step and lagged policies replay token by token):", "",
              "| sampler | tier | " + " | ".join(SCHEDULES) + " |", "|---|---|" + "---:|" * len(SCHEDULES)]
    for r in results:
        total = sum(r["trial_s_by_schedule"].values())
        shares = [f"{r['trial_s_by_schedule'].get(name, 0.0):.0f} ({r['trial_s_by_schedule'].get(name, 0.0) / total:.0%})" for name in SCHEDULES]
        lines.append(f"| {r['sampler']} | {r['tier']} | " + " | ".join(shares) + " |")
    tpe, rand = results[0], results[1]
    lines += [
        "",
        "## Conclusion",
        "",
        f"With 2 workers on the proxy tier, TPE finished {tpe['trials']} trials in its limit ({tpe['trials_per_s']:.2f}/s): a "
        f"{TARGET_TRIALS}-trial study takes ~{to_target(tpe):.0f} s on {samples} search samples; target {TARGET_S:.0f} s on "
        f"{TARGET_SAMPLES} samples: **{'met' if to_target(tpe) <= TARGET_S else 'not met'}**. Random search ran {rand['trials_per_s']:.2f} trials/s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
