"""The live cache and the simulator make the same decisions: on a sample captured from the same
model, every prefill-once preset retains the same positions per layer and KV head in both."""

from __future__ import annotations

import pytest
import torch

from kvsim.live.runner import LiveSample
from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.presets import PRESETS
from kvsim.shape import ARCHITECTURES
from kvsim.sim.continuation import prefill_view
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.store import MODES
from kvsim.traces.workloads import build_workload

WINDOW = 32
PREFILL_ONCE = [name for name, policy in PRESETS.items() if policy.schedule.interval is None]


def capture_float32(loaded, folder, context_tokens):
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=3, context_tokens=context_tokens, count_tokens=count)
    settings = CaptureSettings(window=WINDOW, max_new_tokens=4, storage_dtype="float32", modes=MODES)
    return capture_traceset(loaded, samples, folder, settings, {"spec": "passkey", "seed": 3})


def assert_same_decisions(loaded, traceset, mode, budgets=(0.1, 0.3)):
    """Full-attention layers keep what the simulator keeps; sliding layers keep their last window − 1
    positions whatever the policy."""
    sample = next(traceset.samples(mode))
    shape = traceset.shape
    live = LiveSample(loaded, traceset, sample, WINDOW)
    views = [prefill_view(sample, layer, shape, WINDOW) for layer in shape.policy_layers]
    for name in PREFILL_ONCE:
        for value in budgets:
            budget = Budget(value)
            cache = live.recording.with_policy(PRESETS[name], budget)
            if views:
                simulated, _ = compress_prefill(PRESETS[name], views, budget, sample.prompt_len)
                for layer, keep in zip(shape.policy_layers, simulated):
                    held = cache.kept_positions(layer)
                    for head in range(keep.shape[0]):
                        assert torch.equal(held[head], keep[head].nonzero().flatten()), (name, value, layer, head)
            for layer, window in enumerate(shape.windows):
                if window is not None:
                    expected = torch.arange(sample.prompt_len - window + 1, sample.prompt_len)
                    assert all(torch.equal(held, expected) for held in cache.kept_positions(layer)), (name, layer)


@pytest.fixture(scope="module")
def tiny_float32_traces(tiny_any_model, tmp_path_factory):
    return tiny_any_model, capture_float32(tiny_any_model, tmp_path_factory.mktemp("live-sim") / "traces", 200)


@torch.inference_mode()
def test_live_and_simulated_prefill_decisions_are_identical_on_tiny_models(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    assert_same_decisions(loaded, traceset, "query-aware")


@torch.inference_mode()
def test_live_and_simulated_prefill_decisions_are_identical_on_the_bundled_model(bundled_model, tmp_path):
    traceset = capture_float32(bundled_model, tmp_path / "traces", 300)
    assert_same_decisions(bundled_model, traceset, "query-aware")


@torch.inference_mode()
def test_live_full_policy_reproduces_the_traced_continuation(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples("query-aware"))
    outcome = LiveSample(loaded, traceset, sample, WINDOW).run(PRESETS["full"], Budget(0.5))
    assert outcome.top1 == 1.0
    assert outcome.kl < 1e-4
    assert outcome.prediction == sample.prediction
    compressed = LiveSample(loaded, traceset, sample, WINDOW).run(PRESETS["streaming_llm"], Budget(0.05))
    if traceset.shape.policy_layers:
        assert compressed.kl > outcome.kl
    else:  # every layer slides (the tiny Mistral): nothing to compress, the policy changes nothing
        assert compressed.kl == pytest.approx(outcome.kl, abs=1e-9) and compressed.kv_bytes == outcome.kv_bytes


def test_tiny_models_cover_every_supported_architecture_and_both_layer_kinds(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    shape = traceset.shape
    assert shape == loaded.shape and shape.model_type in ARCHITECTURES
    kinds = {shape.kind(layer) for layer in range(shape.n_layers)}
    if shape.model_type in ("mistral", "gemma3_text"):
        assert "sliding" in kinds and min(w for w in shape.windows if w) < next(traceset.samples()).prompt_len
    assert shape.scaling == pytest.approx(loaded.model.model.layers[0].self_attn.scaling)
