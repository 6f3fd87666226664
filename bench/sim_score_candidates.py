"""Which one-number summary of the simulator best predicts the live model?

Reads a `kvsim fidelity` output (every live run beside its TraceSet), re-simulates the same
(sample, policy, budget) runs to get the per-layer table, and ranks candidate summaries by their
rank correlation with the live metrics over (policy, budget) pair means. The winner becomes
`sim_score` (see `kvsim.sim.simulate`); the table goes to bench/results/sim_score_candidates.md.

Run: `.venv/bin/python bench/sim_score_candidates.py --fidelity runs/fidelity --traces runs/demo/traces`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
from scipy import stats

from kvsim.policies import Budget, resolve_policy
from kvsim.sim.simulate import LAYER_SCHEMA, simulate_sample
from kvsim.traces.store import TraceSet

RESULTS = Path(__file__).parent / "results"

# Per-sample summaries of the per-layer table; higher must mean "closer to the full cache".
CANDIDATES = {
    "1 − mean min(out_err, 1)": (1 - pl.col("out_err").clip(upper_bound=1.0)).mean(),
    "mean attn_recall": pl.col("attn_recall").mean(),
    "1 − max out_err": 1 - pl.col("out_err").max(),
    "mean log(1 − min(out_err, 0.99))": (1 - pl.col("out_err").clip(upper_bound=0.99)).log().mean(),
    "1 − mean out_err² (clipped)": (1 - pl.col("out_err").clip(upper_bound=1.0) ** 2).mean(),
    "1 − rms out_err": 1 - (pl.col("out_err").clip(upper_bound=1.0) ** 2).mean().sqrt(),
    "1 − mean out_err, last half of layers": (1 - pl.col("out_err").clip(upper_bound=1.0)).filter(pl.col("layer") >= pl.col("layer").max() / 2).mean(),
    "mean log attn_recall": pl.col("attn_recall").clip(lower_bound=1e-6).log().mean(),
}
LIVE = ("top1", "kl", "score")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fidelity", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--traces", type=Path, default=Path("runs/demo/traces"))
    args = parser.parse_args()
    live = pl.read_parquet(args.fidelity / "fidelity.parquet")
    traceset = TraceSet.open(args.traces)
    policies = {name: resolve_policy(name) for name in live["policy"].unique().to_list()}
    budgets = {label: Budget.parse(label) for label in live["budget"].unique().to_list()}
    rows = []
    for (sample_id, mode), _ in live.group_by("sample_id", "mode", maintain_order=True):
        sample = traceset.sample(sample_id, mode)
        rows += simulate_sample(traceset, sample, list(policies.values()), list(budgets.values()), oracle=False)
    layers = pl.DataFrame(rows, schema=LAYER_SCHEMA)
    per_sample = layers.group_by("sample_id", "mode", "policy", "budget").agg(
        *(expression.alias(name) for name, expression in CANDIDATES.items())
    )
    joined = live.select("sample_id", "mode", "policy", "budget", *LIVE).join(per_sample, on=["sample_id", "mode", "policy", "budget"])
    pairs = joined.group_by("policy", "budget").agg(pl.all().exclude("sample_id", "mode").mean())
    table = []
    for name in CANDIDATES:
        entry = {"candidate": name}
        for metric in LIVE:
            sign = -1 if metric == "kl" else 1
            entry[f"spearman_{metric}"] = sign * float(stats.spearmanr(pairs[name], pairs[metric]).statistic)
            entry[f"kendall_{metric}"] = sign * float(stats.kendalltau(pairs[name], pairs[metric]).statistic)
        table.append(entry)
    table.sort(key=lambda e: -(e["spearman_top1"] + e["spearman_kl"]))
    lines = [
        "# Which simulator summary predicts the live model best",
        "",
        f"{pairs.height} (policy, budget) pairs × {joined['sample_id'].n_unique()} samples of {args.traces} "
        f"(live runs: {args.fidelity}). Rank correlations over pair means; KL's sign is flipped so that higher is "
        "better everywhere.",
        "",
        "| candidate | Spearman top-1 | Spearman −KL | Spearman score | Kendall top-1 | Kendall −KL | Kendall score |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['candidate']} | {e['spearman_top1']:.3f} | {e['spearman_kl']:.3f} | {e['spearman_score']:.3f} | "
            f"{e['kendall_top1']:.3f} | {e['kendall_kl']:.3f} | {e['kendall_score']:.3f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sim_score_candidates.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "sim_score_candidates.json").write_text(json.dumps(table, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
