"""Benchmark: how well each tier of the simulator predicts the live model, per budget.

Reads the live rows of `bench/quality.py` (bench/results/quality.json: every prefill-once preset
and the searched winner, run live on the held-out samples at each budget and mode) and scores the
same (policy, budget, sample) triples with the proxy simulator on the same traces. Then, within
each (mode, budget), never pooled across budgets, the Spearman rank correlation over policies of
the per-policy means:

- proxy `sim_score` against the live answer log-likelihood, the live task score and the live KL;
- exact tier against the live task score. The exact tier's value *is* live teacher forcing (the
  same cache code and forward, `tests/test_exact.py` checks every preset at two budgets within
  1e-4), so its answer log-likelihood and KL in these rows are the exact tier's; what is left to
  measure is how well that teacher-forced likelihood predicts what the model then generates.

Cost: a proxy replay per row (about 0.1 s). Run after bench/quality.py:
`PYTHONPATH=src .venv/bin/python bench/fidelity_tiers.py`.

Results: bench/results/fidelity_tiers.md and fidelity_tiers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy.stats import spearmanr

from kvsim.policies import PRESETS, Budget, Policy
from kvsim.search.objective import Evaluator
from kvsim.traces.store import TraceSet

RESULTS = Path(__file__).parent / "results"
SEARCHED = "searched"


def correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho, or None where one side is constant (no ranking to agree with)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", default=str(RESULTS / "quality.json"))
    args = parser.parse_args()
    quality = json.loads(Path(args.quality).read_text())
    settings = quality["settings"]
    traceset = TraceSet.open(Path(settings["workdir"]) / f"heldout-{settings['heldout_workload']}-s{settings['heldout_seed']}")
    winners = {key: Policy.from_spec(info["spec"]) for key, info in quality["winners"].items()}
    rows = [r for r in quality["rows"] if r["kind"] in ("preset", SEARCHED)]
    out = []
    for mode in settings["modes"]:
        proxy = Evaluator(traceset, mode)
        for budget in settings["budgets"]:
            here = [r for r in rows if r["mode"] == mode and r["budget"] == budget]
            by_policy: dict[str, list[dict]] = {}
            for r in here:
                by_policy.setdefault(r["policy"], []).append(r)
            if len(by_policy) < 3:
                continue
            means = []
            for name, members in by_policy.items():
                policy = winners[f"{mode} @ {budget:g}"] if name == SEARCHED else PRESETS[name]
                sim = statistics.fmean(proxy.evaluate(policy, Budget(budget), r["sample_id"]).sim_score for r in members)
                means.append({"policy": name, "samples": len(members), "sim_score": sim,
                              **{m: statistics.fmean(r[m] for r in members) for m in ("answer_logprob", "score", "kl")}})
            column = lambda key: [m[key] for m in means]  # noqa: E731
            out.append({
                "mode": mode, "budget": budget, "policies": len(means), "samples": min(m["samples"] for m in means),
                "proxy_vs_answer_logprob": correlation(column("sim_score"), column("answer_logprob")),
                "proxy_vs_score": correlation(column("sim_score"), column("score")),
                "proxy_vs_kl": correlation(column("sim_score"), column("kl")),
                "exact_vs_score": correlation(column("answer_logprob"), column("score")),
                "exact_kl_vs_score": correlation(column("kl"), column("score")),
                "means": means,
            })
            print(f"{mode} @ {budget:g}: {len(means)} policies", flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fidelity_tiers.json").write_text(json.dumps({"source": args.quality, "budgets": out}, indent=2) + "\n")
    fmt = lambda v: "–" if v is None else f"{v:+.2f}"  # noqa: E731
    lines = [
        "# Simulator tiers against the live model, per budget",
        "",
        f"From `{args.quality}` ({quality['settings']['label']} run of bench/quality.py): held-out workload "
        f"`{settings['heldout_workload']}` seed {settings['heldout_seed']}, every prefill-once preset and the searched winner "
        "run live. Spearman's rho over policies of their mean per (mode, budget), never pooled; `–` where one side is "
        "constant. Proxy: `sim_score` of the simulator on the same traces. Exact: the teacher-forced answer log-likelihood "
        "(the exact tier's value, equal to live teacher forcing by construction) and KL (lower is better, so a good "
        "predictor of the task score has a negative rho).",
        "",
        "| mode | budget | policies | samples each | proxy vs answer log-lik. | proxy vs task score | proxy vs KL | exact (answer log-lik.) vs task score | exact KL vs task score |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {b['mode']} | {b['budget']:g} | {b['policies']} | {b['samples']} | {fmt(b['proxy_vs_answer_logprob'])} | {fmt(b['proxy_vs_score'])} | "
          f"{fmt(b['proxy_vs_kl'])} | {fmt(b['exact_vs_score'])} | {fmt(b['exact_kl_vs_score'])} |" for b in out),
        "",
        f"(policy, budget) pairs in all: {sum(b['policies'] for b in out)}.",
    ]
    (RESULTS / "fidelity_tiers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
