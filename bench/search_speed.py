"""Benchmark: how many trials `kvsim search` runs in the issue's 10 minutes, and how fast it reaches a good policy.

Two studies on the same TraceSet and budget, one after the other in one run, each a whole
`kvsim.search.search` call on the proxy tier (the simulator alone) with 2 local workers, stopped by
`--time-limit` (no trial starts after it) or at the trial count, whichever comes first: TPE (the
default sampler), and random search, the baseline a model-based sampler must beat. Beside them, the
exact tier's throughput: evaluations per second of the model teacher-forced over compressed caches,
as one search worker runs them. The studies' run folders stay in --workdir; `--existing` reads them
again (with the wall time each run saved) and measures the exact tier anew.

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
import statistics
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from rich.console import Console

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.policies import PRESETS, Budget
from kvsim.search import SearchSettings, search
from kvsim.search.run import one_torch_thread
from kvsim.sim.exact import ExactEvaluator
from kvsim.traces.models import load_model
from kvsim.traces.store import TraceSet

RESULTS = Path(__file__).parent / "results"
TARGET_TRIALS, TARGET_SAMPLES, TARGET_S = 500, 32, 600.0  # trials, samples in the TraceSet, seconds
STUDIES = [("tpe", 2), ("random", 2)]  # (sampler, workers), proxy tier
EXACT_POLICIES = ("snapkv", "keydiff", "tova", "pyramidkv", "knorm")
SCHEDULES = ("prefill", "every_step", "lagged")


def run_study(traces: Path, rundir: Path, sampler: str, workers: int, trials: int, seconds: float, budget: float, held_out: float) -> dict:
    settings = SearchSettings(traces=traces, budget=Budget(budget), rundir=rundir, study=f"{sampler}-{workers}-proxy", trials=trials,
                              sampler=sampler, workers=workers, validation=held_out, test=0.0, tier="proxy", time_limit_s=seconds)
    start = time.perf_counter()
    search(settings)
    (rundir / "wall_s.json").write_text(json.dumps(time.perf_counter() - start))
    return read_study(rundir, sampler, workers, seconds)


def read_study(rundir: Path, sampler: str, workers: int, seconds: float) -> dict:
    """The measurements of a finished study in `rundir` (its wall time as `run_study` saved it)."""
    summary = json.loads((rundir / "search.json").read_text())
    wall = json.loads((rundir / "wall_s.json").read_text())
    study = optuna.load_study(study_name=summary["study"], storage=JournalStorage(JournalFileBackend(str(rundir / "study.journal"))))
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
        "limit_s": seconds,
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


def exact_rate(traces: Path, samples: int, budget: float) -> dict:
    """The exact tier's throughput in one process on one thread, as a search worker runs it: the
    first evaluation of a sample prefills it (once per worker), every later one is marginal."""
    traceset = TraceSet.open(traces)
    mode = next(iter(traceset.manifest["mode"]))
    ids = [sample.sample_id for sample in traceset.samples(mode)][:samples]
    loaded = load_model(traceset.meta["model"]["id"])
    evaluator = ExactEvaluator(loaded, traceset, mode)
    first, later = [], []
    with one_torch_thread():
        for sample_id in ids:
            for index, name in enumerate(EXACT_POLICIES):
                start = time.perf_counter()
                evaluator.evaluate(PRESETS[name], Budget(budget), sample_id)
                (first if index == 0 else later).append(time.perf_counter() - start)
    return {"samples": len(ids), "policies": list(EXACT_POLICIES), "first_s": statistics.median(first), "marginal_s": statistics.median(later),
            "evaluations_per_s": len(ids) * len(EXACT_POLICIES) / (sum(first) + sum(later))}


def time_to(timeline: list[tuple[float, float]], quality: float) -> float | None:
    return next((seconds for seconds, best in timeline if best >= quality), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=Path("runs/default32/traces"))
    parser.add_argument("--trials", type=int, default=TARGET_TRIALS)
    parser.add_argument("--minutes", type=float, default=TARGET_S / 60, help="time limit of each study")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--held-out", type=float, default=0.0, help="share of the samples kept for re-ranking (0: every trial runs on all of them)")
    parser.add_argument("--exact-samples", type=int, default=4, help="samples the exact tier's rate is measured on")
    parser.add_argument("--workdir", type=Path, default=Path("runs/search_speed"), help="the studies' run folders")
    parser.add_argument("--existing", action="store_true", help="read the studies already finished in --workdir instead of running them")
    args = parser.parse_args()
    console = Console()
    load_at_start = os.getloadavg()
    results = []
    runs = [(sampler, workers, args.workdir / f"{sampler}-{workers}-proxy") for sampler, workers in STUDIES]
    if not args.existing and any(rundir.exists() for _, _, rundir in runs):
        # A run folder holds a study that `search` would resume, mixing two runs' trials.
        raise SystemExit(f"error: {args.workdir} already holds studies: pass --existing to read them, or remove it to measure anew")
    for sampler, workers, rundir in runs:
        seconds = 60 * args.minutes
        if args.existing:
            result = read_study(rundir, sampler, workers, seconds)
        else:
            console.print(f"[bold]{sampler}, {workers} worker(s), proxy tier: {args.trials} trials or {seconds:.0f} s[/]")
            result = run_study(args.traces, rundir, sampler, workers, args.trials, seconds, args.budget, args.held_out)
        console.print({k: v for k, v in result.items() if k != "timeline"})
        results.append(result)
    quality = min(r["best"] for r in results)
    for result in results:
        result["time_to_q_s"] = time_to(result["timeline"], quality)
        result["time_to_99pct_q_s"] = time_to(result["timeline"], 0.99 * quality)
    console.print("[bold]exact tier: evaluations per second[/]")
    exact = exact_rate(args.traces, args.exact_samples, args.budget)
    console.print(exact)
    report = {
        "machine": machine_info(load_at_start),
        "settings": {"traces": str(args.traces.resolve()), "trials": args.trials, "minutes": args.minutes, "budget": args.budget,
                     "held_out": args.held_out, "existing": args.existing},
        "quality_q": quality,
        "results": results,
        "exact": exact,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "search_speed.md").write_text(markdown(report))
    console.print(markdown(report))


def to_target(result: dict) -> float:
    """Seconds a 500-trial study takes: measured when it finished them, else its setup and reporting time plus 500 trials at its rate."""
    return result["wall_s"] - result["trials_s"] + TARGET_TRIALS / result["trials_per_s"]


def markdown(report: dict) -> str:
    settings, machine, exact = report["settings"], report["machine"], report["exact"]
    results = report["results"]
    samples = results[0]["search_samples"]
    lines = [
        "# Search speed benchmark",
        "",
        f"`bench/search_speed.py`: `kvsim search` studies on the proxy tier of at most {settings['trials']} trials, each stopped after "
        f"{settings['minutes']:g} min of trials (`--time-limit`), one after the other, on `{settings['traces']}` ({samples} search samples, "
        f"held-out share {settings['held_out']}), budget {settings['budget']}, mode query-aware, the whole policy space (stepwise "
        f"schedules included); {machine['cpu_count']} CPUs, 1-minute load average {machine['load_average']['start'][0]:.1f} at start, "
        f"{machine['load_average']['end'][0]:.1f} at end{' (of this script reading finished studies)' if settings.get('existing') else ''}. "
        f"q = {report['quality_q']:.4f} (the lower final best sim_score of the two studies).",
        "",
        "| sampler | workers | trials in limit | complete / pruned / failed | wall s | trials s | trials/s | to 500 s | samples/trial "
        "| best | time to q s | time to 0.99 q s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        states = r["states"]
        counts = f"{states.get('complete', 0)} / {states.get('pruned', 0)} / {states.get('fail', 0)}"
        to_q = "–" if r.get("time_to_q_s") is None else f"{r['time_to_q_s']:.0f}"
        to_99 = "–" if r.get("time_to_99pct_q_s") is None else f"{r['time_to_99pct_q_s']:.0f}"
        lines.append(
            f"| {r['sampler']} | {r['workers']} | {r['trials']} | {counts} | {r['wall_s']:.0f} | {r['trials_s']:.0f} | "
            f"{r['trials_per_s']:.2f} | {to_target(r):.0f} | {r['samples_per_trial']:.1f} | {r['best']:.4f} | {to_q} | {to_99} |"
        )
    lines += ["", "Worker-seconds of trials by the policy's schedule (every-step and lagged policies replay token by token):", "",
              "| sampler | " + " | ".join(SCHEDULES) + " |", "|---|" + "---:|" * len(SCHEDULES)]
    for r in results:
        total = sum(r["trial_s_by_schedule"].values())
        shares = [f"{r['trial_s_by_schedule'].get(name, 0.0):.0f} ({r['trial_s_by_schedule'].get(name, 0.0) / total:.0%})" for name in SCHEDULES]
        lines.append(f"| {r['sampler']} | " + " | ".join(shares) + " |")
    lines += [
        "",
        f"The exact tier, beside it: {', '.join(exact['policies'])} on {exact['samples']} samples in one process on one thread, as a "
        f"worker runs them. A sample's first evaluation (its one prefill per worker included) takes {exact['first_s']:.2f} s (median), "
        f"each later one {exact['marginal_s']:.2f} s: **{exact['evaluations_per_s']:.2f} evaluations/s** per worker in all.",
    ]
    tpe, rand = results[0], results[1]
    lines += [
        "",
        "## Conclusion",
        "",
        f"With 2 workers, TPE finished {tpe['trials']} trials in its limit ({tpe['trials_per_s']:.2f}/s): a {TARGET_TRIALS}-trial study "
        f"takes ~{to_target(tpe):.0f} s on {samples} search samples; target {TARGET_S:.0f} s on {TARGET_SAMPLES} samples: "
        f"**{'met' if to_target(tpe) <= TARGET_S else 'not met'}**. Random search ran {rand['trials_per_s']:.2f} trials/s "
        f"against TPE's {tpe['trials_per_s']:.2f}: more of its trials are pruned early ({rand['samples_per_trial']:.1f} samples per trial "
        f"against {tpe['samples_per_trial']:.1f}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
