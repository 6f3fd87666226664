"""Benchmark: where does the bundled model still have signal, and how well does the proxy rank within
one budget?

Per evaluation mode, budget and preset, on the default workload: the exact tier's teacher-forced
metrics (answer log-likelihood, answer match, KL, top-1: by construction what `kvsim validate`
measures teacher-forced, see tests/test_exact.py), the live task score of a greedy generation on
the first `--live-samples` samples, and the proxy's `sim_score`. It answers two questions:
- the demo's budget: where the best preset keeps part, but not all, of the full cache's answer
  likelihood and task score (every compressed policy scores 0 at 0.2 on this model);
- the proxy's fidelity within one budget (never pooled across budgets): Spearman correlation of
  `sim_score` with the exact tier's answer log-likelihood and KL over the presets.

Run: `.venv/bin/python bench/budget_signal.py` (about 20 min on 2 idle cores); results go to
bench/results/budget_signal.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from rich.console import Console
from scipy.stats import spearmanr

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.policies import PRESETS, Budget
from kvsim.sim.exact import ExactEvaluator
from kvsim.sim.simulate import prepare_sample, sim_score
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.models import DEFAULT_MODEL, load_model
from kvsim.traces.store import MODES, TraceSet
from kvsim.traces.workloads import build_workload

RESULTS = Path(__file__).parent / "results"
PRESET_NAMES = ("snapkv", "tova", "adakv", "h2o", "streaming_llm", "knorm", "pyramidkv", "cake_prefill", "expected_attention", "keydiff")


def traces(loaded, folder: Path, samples: int, context_tokens: int) -> TraceSet:
    if not (folder / "manifest.parquet").exists():
        count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        workload = build_workload("default", samples, seed=0, context_tokens=context_tokens, count_tokens=count)
        capture_traceset(loaded, workload, folder, CaptureSettings(window=64, max_new_tokens=16, modes=MODES), {"spec": "default", "seed": 0})
    return TraceSet.open(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--live-samples", type=int, default=3, help="samples on which the task score is measured live")
    parser.add_argument("--budgets", default="0.1,0.2,0.35,0.5,0.7")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-budget-signal"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()
    console = Console()
    loaded = load_model(DEFAULT_MODEL)
    traceset = traces(loaded, args.workdir / "traces", args.samples, args.context_tokens)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for mode in MODES:
        exact = ExactEvaluator(loaded, traceset, mode)
        samples = list(traceset.samples(mode))
        prepared = {s.sample_id: prepare_sample(traceset, s) for s in samples}
        for budget in map(Budget, budgets):
            for name in ("full", *PRESET_NAMES):
                policy = PRESETS[name]
                for index, sample in enumerate(samples):
                    forced = exact.evaluate(policy, budget, sample.sample_id)
                    live = exact.live_sample(sample.sample_id).run(policy, budget) if index < args.live_samples else None
                    rows.append({
                        "mode": mode, "budget": budget.value, "policy": name, "sample_id": sample.sample_id,
                        "sim_score": sim_score(prepared[sample.sample_id].replay(policy, budget)),
                        "answer_logprob": forced.answer_logprob, "answer_match": forced.answer_match,
                        "kl": forced.kl, "top1": forced.top1, "score": None if live is None else live.score,
                    })
                console.print(f"{mode} {budget.label} {name}: answer log-lik. "
                              f"{statistics.fmean(r['answer_logprob'] for r in rows[-len(samples):]):.3f}", highlight=False)
            write(rows, budgets, args, load_at_start)


def summarize(rows: list[dict], budgets: list[float]) -> tuple[list[dict], list[dict]]:
    means, fidelity = [], []
    for mode in MODES:
        for budget in budgets:
            group = [r for r in rows if r["mode"] == mode and r["budget"] == budget]
            by_policy = {}
            for r in group:
                by_policy.setdefault(r["policy"], []).append(r)
            for policy, members in by_policy.items():
                scored = [r["score"] for r in members if r["score"] is not None]
                means.append({
                    "mode": mode, "budget": budget, "policy": policy, "samples": len(members),
                    **{m: statistics.fmean(r[m] for r in members) for m in ("sim_score", "answer_logprob", "answer_match", "kl", "top1")},
                    "score": statistics.fmean(scored) if scored else None, "score_samples": len(scored),
                })
            compressed = [m for m in means if m["mode"] == mode and m["budget"] == budget and m["policy"] != "full"]
            if len(compressed) >= 3:
                sims = [m["sim_score"] for m in compressed]
                fidelity.append({
                    "mode": mode, "budget": budget, "pairs": len(compressed),
                    "spearman_answer_logprob": spearmanr(sims, [m["answer_logprob"] for m in compressed]).statistic,
                    "spearman_kl": spearmanr(sims, [m["kl"] for m in compressed]).statistic,
                })
    return means, fidelity


def write(rows: list[dict], budgets: list[float], args, load_at_start) -> None:
    means, fidelity = summarize(rows, budgets)
    RESULTS.mkdir(exist_ok=True)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "means": means, "fidelity": fidelity, "rows": rows,
              "machine": machine_info(load_at_start)}
    (RESULTS / "budget_signal.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Signal against budget, and the proxy's fidelity within one budget", "",
             f"Bundled model, default workload, {args.samples} samples per mode (live task score on the first "
             f"{args.live_samples}), context {args.context_tokens} tokens, 1 torch thread. Load average at start "
             f"{load_at_start[0]:.2f}, now {os.getloadavg()[0]:.2f}. Answer log-likelihood: mean log-probability of the "
             "reference answer's tokens teacher-forced after the question (full cache for reference).", "",
             "| mode | budget | policy | answer log-lik. | answer match | task score (live) | KL | top-1 | sim_score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in means:
        score = "–" if m["score"] is None else f"{m['score']:.2f} (n={m['score_samples']})"
        lines.append(f"| {m['mode']} | {m['budget']} | {m['policy']} | {m['answer_logprob']:.3f} | {m['answer_match']:.2f} | {score} | "
                     f"{m['kl']:.3f} | {m['top1']:.3f} | {m['sim_score']:.4f} |")
    lines += ["", "Spearman of the proxy's sim_score over the presets, within one budget:", "",
              "| mode | budget | pairs | vs answer log-lik. | vs KL |", "|---|---|---|---|---|"]
    lines += [f"| {f['mode']} | {f['budget']} | {f['pairs']} | {f['spearman_answer_logprob']:+.2f} | {f['spearman_kl']:+.2f} |" for f in fidelity]
    (RESULTS / "budget_signal.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
