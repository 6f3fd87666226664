"""The fidelity report: correlations that mean what they say, and the command end to end."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from kvsim.cli.main import app
from kvsim.live.fidelity import correlations, write_fidelity_report

runner = CliRunner()


def synthetic_table(live_order):
    """Four (policy, budget) pairs × two samples whose live metrics follow `live_order` of sim_score."""
    rows = []
    for rank, policy in enumerate(["a", "b", "c", "d"]):
        for sample in ("s1", "s2"):
            live = live_order[rank]
            rows.append({"sample_id": sample, "mode": "query-aware", "policy": policy, "budget": "0.1",
                         "sim_score": 0.2 * rank + (0.01 if sample == "s1" else 0.0), "sim_attn_recall": 0.5,
                         "sim_out_err": 1 - 0.2 * rank, "score": float(live), "kl": 1.0 / (1 + live), "top1": live / 4})
    return pl.DataFrame(rows)


def test_rank_correlations_follow_the_orders():
    agreeing = correlations(synthetic_table([0, 1, 2, 3])).filter(pl.col("level") == "pairs")
    by_metric = {(r["simulated"], r["live"]): r for r in agreeing.iter_rows(named=True)}
    assert by_metric[("sim_score", "top1")]["spearman"] == pytest.approx(1.0)
    assert by_metric[("sim_score", "kl")]["kendall"] == pytest.approx(-1.0)
    assert by_metric[("sim_out_err", "score")]["spearman"] == pytest.approx(-1.0)
    assert by_metric[("sim_attn_recall", "score")]["spearman"] is None  # a constant has no rank order
    reversed_ = correlations(synthetic_table([3, 2, 1, 0])).filter(pl.col("level") == "pairs")
    row = reversed_.filter((pl.col("simulated") == "sim_score") & (pl.col("live") == "top1")).row(0, named=True)
    assert row["spearman"] == pytest.approx(-1.0)


def test_report_files_are_written(tmp_path):
    paths = write_fidelity_report(synthetic_table([0, 2, 1, 3]), tmp_path)
    assert all(path.stat().st_size > 0 for path in paths.values())
    page = paths["fidelity.html"].read_text()
    assert "<svg" in page and "Rank correlations" in page
    assert pl.read_csv(paths["correlations.csv"]).height == 2 * 3 * 3


def test_fidelity_command_on_a_tiny_model(tmp_path, tiny_llama):
    folder = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    traces = tmp_path / "traces"
    capture = runner.invoke(app, ["capture", "--model", str(folder), "--workload", "passkey", "--samples", "2",
                                  "--context-tokens", "200", "--window", "16", "--max-new-tokens", "4", "--out", str(traces)])
    assert capture.exit_code == 0, capture.output
    args = ["fidelity", "--traces", str(traces), "--model", str(folder), "--policy", "knorm,random,streaming_llm",
            "--budget", "0.1,0.5", "--samples", "2", "--out", str(tmp_path / "fidelity")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(tmp_path / "fidelity" / "fidelity.parquet")
    assert table.height == 3 * 2 * 2 and set(table["policy"]) == {"knorm", "random", "streaming_llm"}
    assert "Spearman" in result.output
    too_few = runner.invoke(app, ["fidelity", "--traces", str(traces), "--policy", "knorm", "--budget", "0.1",
                                  "--out", str(tmp_path / "f2")])
    assert too_few.exit_code == 2 and "at least 3" in too_few.output
