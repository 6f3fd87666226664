"""The simulator: hand-computed metrics, the oracle bound, budgets, and both evaluation modes."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.policies import PRESETS
from kvsim.sim import simulate
from kvsim.sim.continuation import continuation_attention, prefill_view
from kvsim.sim.replay import replay_selection
from kvsim.traces.continuation import reference_tensors
from kvsim.traces.store import TraceSet
from kvsim.traces.synthetic import synthetic_traceset


def one_head_traceset(root, keys, values, queries, prompt_len, needle=None):
    """A 1-layer, 1-head TraceSet with the given tensors ([T, d] keys/values, [rows, d] queries)."""
    traceset = synthetic_traceset(
        root, n_layers=1, kv_heads=1, group=1, head_dim=keys.shape[1], prompt_len=prompt_len,
        continuation=keys.shape[0] - prompt_len, window=1, needle=needle,
    )
    sample = next(iter(traceset))
    tensors = {name: tensor.clone() for name, tensor in sample.tensors.items()}
    tensors["layers.0.k"], tensors["layers.0.v"], tensors["layers.0.q"] = keys[None], values[None], queries[None]
    tensors.update(reference_tensors(tensors, prompt_len, 1, traceset.shape))  # the full cache of the new tensors
    traceset.add(sample.row, tensors)
    return TraceSet.open(root)


def test_hand_computed_recall_and_error(tmp_path):
    # Zero queries attend uniformly: each of the 5 visible tokens gets 1/5.
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    traceset = one_head_traceset(tmp_path, torch.zeros(5, 2), values, torch.zeros(2, 2), prompt_len=4, needle=(2, 3))
    sample = next(iter(traceset))
    view = prefill_view(sample, 0, traceset.shape, window=1)
    full = continuation_attention(sample, 0, window=1, scaling=traceset.shape.scaling)
    keep = torch.tensor([[True, False, True, False]])
    (outcome,) = replay_selection([keep], [view], [full])
    means = outcome.metrics.means()
    assert means["attn_recall"] == pytest.approx(3 / 5)
    full_out = values.mean(0)  # (0.8, 0.8)
    kept_out = values[[0, 2, 4]].mean(0)  # (4/3, 1/3)
    expected_error = float((kept_out - full_out).norm() / full_out.norm())
    assert means["out_err"] == pytest.approx(expected_error, rel=1e-5)
    assert means["evidence_recall"] == pytest.approx(1.0)  # the needle (position 2) is kept
    assert outcome.kept_tokens == 2 and outcome.kv_bytes == 2 * 2 * 2 * 2  # prompt tokens held after the decision

    (dropped,) = replay_selection([~keep], [view], [full])
    assert dropped.metrics.means()["evidence_recall"] == 0.0


def test_keeping_everything_is_exact(tmp_path):
    traceset = synthetic_traceset(tmp_path, prompt_len=32, continuation=4, window=4)
    sample = next(iter(traceset))
    views = [prefill_view(sample, layer, traceset.shape, 4) for layer in range(2)]
    fulls = [continuation_attention(sample, layer, 4, traceset.shape.scaling) for layer in range(2)]
    for outcome in replay_selection([torch.ones(2, 32, dtype=torch.bool)] * 2, views, fulls):
        assert outcome.metrics.means()["attn_recall"] == pytest.approx(1.0, abs=1e-6)
        assert outcome.metrics.means()["out_err"] == pytest.approx(0.0, abs=1e-5)


def test_budget_is_met_exactly_and_tables_have_the_documented_columns(tmp_path):
    traceset = synthetic_traceset(tmp_path, samples=2, prompt_len=50, continuation=6, window=32)
    result = simulate(traceset, [PRESETS["snapkv"]], [0.2, 11])
    assert set(result.layers.columns) >= {"sample_id", "policy", "budget", "layer", "attn_recall", "out_err",
                                          "evidence_recall", "kv_bytes"}
    assert set(result.samples["policy"]) == {"snapkv", "oracle"}
    per_head = {"0.2": 10, "11tok": 11}
    for row in result.layers.filter(result.layers["policy"] == "snapkv").iter_rows(named=True):
        # Prompt tokens at the budget for each of 2 KV heads, right after the prompt's decision.
        assert row["kept_tokens"] == 2 * per_head[row["budget"]]
    # The oracle moves tokens between layers but holds the same total.
    totals = result.layers.group_by("sample_id", "policy", "budget").agg(pl.col("kept_tokens").sum())
    for row in totals.iter_rows(named=True):
        assert row["kept_tokens"] == 2 * 2 * per_head[row["budget"]]
    assert result.samples.height == 2 * 2 * 2 and result.samples["sim_score"].is_between(0, 1).all()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([0.05, 0.1, 0.25, 0.5]))
def test_no_policy_recalls_more_than_the_oracle(tmp_path_factory, seed, budget):
    traceset = synthetic_traceset(tmp_path_factory.mktemp("t"), prompt_len=40, continuation=5, window=32, seed=seed)
    table = simulate(traceset, list(PRESETS.values()), [budget]).samples
    oracle = table.filter(table["policy"] == "oracle")["attn_recall"][0]
    others = table.filter(table["policy"] != "oracle")
    # Only plain-dropping policies that keep at most the budget compete on recall.
    comparable = others.filter(~others["policy"].is_in(["full", "mikv", "d2o", "ems"]))
    assert (comparable["attn_recall"] <= oracle + 1e-6).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_recall_does_not_fall_when_the_budget_grows(tmp_path_factory, seed):
    traceset = synthetic_traceset(tmp_path_factory.mktemp("t"), prompt_len=48, continuation=4, window=32, seed=seed)
    table = simulate(traceset, [PRESETS["snapkv"]], [0.1, 0.2, 0.4, 0.8], oracle=True).samples
    for policy in ("snapkv", "oracle"):
        recalls = table.filter(table["policy"] == policy)["attn_recall"].to_list()
        assert all(a <= b + 1e-6 for a, b in zip(recalls, recalls[1:]))


def test_budget_above_the_prompt_is_a_clear_error(tmp_path):
    from kvsim.errors import KvsimError

    traceset = synthetic_traceset(tmp_path, prompt_len=40, continuation=2, window=32)
    with pytest.raises(KvsimError, match="above the prompt length 40"):
        simulate(traceset, [PRESETS["snapkv"]], [64])
    assert math.isfinite(simulate(traceset, [PRESETS["snapkv"]], [40]).samples["sim_score"][0])


def test_policy_needing_a_longer_window_than_the_traces_is_refused(tmp_path):
    from kvsim.errors import KvsimError

    traceset = synthetic_traceset(tmp_path, prompt_len=40, continuation=2, window=8)
    with pytest.raises(KvsimError, match="capture with --window 32"):
        simulate(traceset, [PRESETS["snapkv"]], [0.5])
