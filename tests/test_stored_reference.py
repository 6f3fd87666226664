"""The continuation's full-cache attention stored by capture (TraceSet format 4): the simulator
reads it instead of recomputing it, gives the numbers recomputing gives, and still recomputes it
for older sets."""

from __future__ import annotations

import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS
from kvsim.sim import simulate
from kvsim.traces.continuation import continuation_reference
from kvsim.traces.store import MODES, TraceSet
from kvsim.traces.synthetic import synthetic_traceset

COMPARED = ("attn_recall", "out_err", "evidence_recall", "sim_score")


def assert_same_results(stored: TraceSet, recomputed: TraceSet, policies, budgets) -> None:
    assert stored.stores_reference and not recomputed.stores_reference
    ours, theirs = (simulate(t, policies, budgets).samples.sort("sample_id", "mode", "policy", "budget") for t in (stored, recomputed))
    assert ours["policy"].to_list() == theirs["policy"].to_list()
    assert ours["kv_bytes"].to_list() == theirs["kv_bytes"].to_list()
    for column in COMPARED:
        a, b = ours[column].fill_null(-1.0), theirs[column].fill_null(-1.0)
        assert (a - b).abs().max() < 1e-5, column


def as_format_3(traceset: TraceSet) -> TraceSet:
    """The same files read as an older set, which the simulator recomputes the reference for."""
    return TraceSet(traceset.root, traceset.manifest, {**traceset.meta, "format_version": 3})


def test_every_preset_scores_the_same_from_the_stored_reference_as_from_recomputing_it(tmp_path):
    shape = {"n_layers": 2, "kv_heads": 2, "group": 2, "prompt_len": 80, "continuation": 6, "window": 32, "needle": (30, 36)}
    stored = synthetic_traceset(tmp_path / "new", **shape)
    old = synthetic_traceset(tmp_path / "old", reference=False, **shape)  # same seed: the same tensors, format 3
    assert old.meta["format_version"] == 3 and old.verify() == [] and stored.verify() == []
    assert "continuation.lse" not in next(iter(old)).tensors
    assert_same_results(stored, old, list(PRESETS.values()), [0.1, 0.3])


def test_a_capture_stores_what_the_simulator_would_compute_from_its_tensors(tiny_llama, tmp_path):
    from kvsim.traces.capture import CaptureSettings, capture_traceset
    from kvsim.traces.workloads import build_workload

    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=2, context_tokens=200, count_tokens=count)
    settings = CaptureSettings(window=32, max_new_tokens=5, storage_dtype="float16", modes=MODES)
    traceset = capture_traceset(tiny_llama, samples, tmp_path / "t", settings, {"spec": "passkey"})
    assert traceset.meta["format_version"] == 4 and traceset.verify() == []
    for sample in traceset:
        stored = sample.stored_reference()
        for index, layer in enumerate(traceset.shape.policy_layers):
            trace = sample.layer(layer)
            expected = continuation_reference(trace.q[:, 32:], trace.k, trace.v, sample.prompt_len, traceset.shape.scaling)
            for part in ("output", "lse", "prompt_mass"):
                torch.testing.assert_close(getattr(stored.layer(index), part), getattr(expected, part))
        # Each row's probabilities sum to one: the log-sum-exp normalizes what the row sees.
        assert stored.prompt_mass.sum(-1).le(sample.total_len - sample.prompt_len + 1e-4).all()
    policies = [PRESETS[name] for name in ("snapkv", "pyramidkv", "h2o", "tova", "mikv", "d2o", "lazy")]
    assert_same_results(traceset, as_format_3(traceset), policies, [0.2])


def test_a_format_4_file_without_its_reference_is_a_clear_error(tmp_path):
    traceset = synthetic_traceset(tmp_path / "t", window=32)
    sample = next(iter(traceset))
    traceset.add(sample.row, {name: t for name, t in sample.tensors.items() if name != "continuation.lse"})
    damaged = TraceSet.open(tmp_path / "t")
    assert any("continuation.lse is missing" in line for line in damaged.verify())
    with pytest.raises(KvsimError, match="has no tensor continuation.lse"):
        simulate(damaged, [PRESETS["snapkv"]], [0.5])


def test_the_oracle_reads_the_stored_prompt_mass(tmp_path):
    traceset = synthetic_traceset(tmp_path / "t", prompt_len=48, continuation=5, window=8)
    result = simulate(traceset, [], [0.25]).layers
    assert set(result["policy"]) == {"oracle"}
    recomputed = simulate(as_format_3(traceset), [], [0.25]).layers
    assert result["kept_tokens"].to_list() == recomputed["kept_tokens"].to_list()
    assert (result["attn_recall"] - recomputed["attn_recall"]).abs().max() < 1e-6
