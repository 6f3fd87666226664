"""Replays beyond prefill-once: every-step and lagged schedules, merging and low-precision retention,
the `full` preset, and both evaluation modes end to end."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

import torch

from kvsim.policies import PRESETS, Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.held import HeldLayer
from kvsim.policies.retention import Merge, Quantize
from kvsim.policies.schedules import EveryStep, Lagged
from kvsim.sim import simulate
from kvsim.sim.continuation import continuation_attention, prefill_view
from kvsim.traces.synthetic import synthetic_traceset

PROMPT, CONTINUATION, KV_HEADS, LAYERS = 60, 9, 2, 2


@pytest.fixture(scope="module")
def traceset(tmp_path_factory):
    return synthetic_traceset(
        tmp_path_factory.mktemp("t"), n_layers=LAYERS, kv_heads=KV_HEADS, prompt_len=PROMPT,
        continuation=CONTINUATION, window=32, needle=(20, 24),
    )


def summary(traceset, policy, budget):
    return simulate(traceset, [policy], [budget], oracle=False)


def test_full_keeps_everything_whatever_the_budget(traceset):
    result = summary(traceset, PRESETS["full"], 0.05)
    row = result.samples.row(0, named=True)
    assert row["attn_recall"] == pytest.approx(1.0, abs=1e-6) and row["out_err"] == pytest.approx(0.0, abs=1e-5)
    assert row["sim_score"] == pytest.approx(1.0, abs=1e-5) and row["evidence_recall"] == pytest.approx(1.0)
    assert (result.layers["kept_tokens"] == KV_HEADS * PROMPT).all()  # counted after the prompt's decision


def test_every_step_holds_each_head_at_its_budget(traceset):
    h2o = PRESETS["h2o"]
    layers = summary(traceset, replace(h2o, schedule=EveryStep(recent=4)), 0.25).layers
    # 15 tokens per head after every step (the newest token joined, then one left).
    assert (layers["kept_tokens"] == KV_HEADS * 15).all()


def test_lagged_eviction_lets_the_cache_grow_between_evictions(traceset):
    lagged = replace(PRESETS["h2o"], schedule=Lagged(recent=4, every=4))
    sample = next(iter(traceset))
    view, full = prefill_view(sample, 0, traceset.shape, 32), continuation_attention(sample, 0, 32, traceset.shape.scaling)
    (keep,), budgets = compress_prefill(lagged, [view], Budget(0.25), PROMPT)
    layer = HeldLayer.after_prefill(lagged, view, keep, budgets[0], 32, torch.float32)
    held = []
    for row in range(CONTINUATION):
        position = PROMPT + row
        layer.append(full.keys[:, position : position + 1], full.values[:, position : position + 1])
        layer.attend(full.queries[:, :, row : row + 1].reshape(view.heads, 1, -1))
        held.append(layer.held_tokens()[0] // KV_HEADS)
    # Evictions after tokens 4 and 8 bring each head back to 15; in between the cache grows.
    assert held == [16, 17, 18, 15, 16, 17, 18, 15, 16]


def test_every_step_at_the_whole_prompt_evicts_only_as_the_continuation_grows(traceset):
    every_step = replace(PRESETS["h2o"], schedule=EveryStep())
    whole = summary(traceset, every_step, Budget(PROMPT))
    quarter = summary(traceset, every_step, 0.25)
    assert (whole.layers["kept_tokens"] == KV_HEADS * PROMPT).all()
    assert 0.5 < whole.samples["attn_recall"][0] < 1 and whole.samples["attn_recall"][0] > quarter.samples["attn_recall"][0]


def test_low_precision_keeps_evicted_tokens_readable_and_counts_their_bytes(traceset):
    snapkv = PRESETS["snapkv"]
    dropped = summary(traceset, snapkv, 0.1).samples.row(0, named=True)
    kept_8bit = summary(traceset, replace(snapkv, retention=Quantize(nbits=8)), 0.1)
    row = kept_8bit.samples.row(0, named=True)
    assert row["attn_recall"] == pytest.approx(1.0, abs=1e-6)  # evicted tokens stay readable
    assert row["out_err"] < dropped["out_err"] / 10
    low = kept_8bit.layers["low_precision_tokens"]
    assert (low == KV_HEADS * (PROMPT - 6)).all()
    head_dim = 16
    full_bytes = KV_HEADS * 6 * 2 * head_dim * 2  # right after the prompt's decision
    assert (kept_8bit.layers["kv_bytes"] == full_bytes + low * 2 * (head_dim + 4)).all()


def test_merging_changes_the_output_but_not_what_is_readable(traceset):
    snapkv = PRESETS["snapkv"]
    dropped = summary(traceset, snapkv, 0.2).samples.row(0, named=True)
    merged = summary(traceset, replace(snapkv, retention=Merge(threshold=-1.0)), 0.2).samples.row(0, named=True)
    assert merged["attn_recall"] == pytest.approx(dropped["attn_recall"])
    assert merged["out_err"] != pytest.approx(dropped["out_err"])


def test_both_evaluation_modes_from_a_real_capture(tiny_llama, tmp_path):
    from kvsim.traces.capture import CaptureSettings, capture_traceset
    from kvsim.traces.store import MODES
    from kvsim.traces.workloads import build_workload

    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=1, context_tokens=200, count_tokens=count)
    settings = CaptureSettings(window=32, max_new_tokens=4, storage_dtype="float16", modes=MODES)
    traceset = capture_traceset(tiny_llama, samples, tmp_path / "t", settings, {"spec": "passkey"})
    table = simulate(traceset, [PRESETS["snapkv"], PRESETS["tova"]], [0.2]).samples
    assert sorted(table["mode"].unique()) == sorted(MODES)
    assert table.group_by("mode").agg(pl.len())["len"].to_list() == [3, 3]
    only_agnostic = simulate(traceset, [PRESETS["snapkv"]], [0.2], mode="query-agnostic").layers
    assert set(only_agnostic["mode"]) == {"query-agnostic"} and only_agnostic.height == 3 * 2  # layers × (snapkv, oracle)
