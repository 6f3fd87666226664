"""The live cache and the simulator make the same decisions: on a sample captured from the same
model, every prefill-once preset retains the same positions per layer and KV head in both (KVzip
included: capture and the live cache run the same reconstruction pass)."""

from __future__ import annotations

import pytest
import torch

from kvsim.live.runner import LiveSample
from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.presets import PRESETS
from kvsim.policies.rope import Rotary
from kvsim.sim.continuation import prefill_view
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.store import MODES
from kvsim.traces.workloads import build_workload

WINDOW = 64  # the longest window a preset reads (expected_attention)
PREFILL_ONCE = [name for name, policy in PRESETS.items() if policy.schedule.interval is None]


def capture_float32(loaded, folder, context_tokens):
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=3, context_tokens=context_tokens, count_tokens=count)
    settings = CaptureSettings(window=WINDOW, max_new_tokens=4, storage_dtype="float32", modes=MODES, kvzip=True)
    return capture_traceset(loaded, samples, folder, settings, {"spec": "passkey", "seed": 3})


def assert_same_decisions(loaded, traceset, mode, budgets=(0.1, 0.3)):
    sample = next(traceset.samples(mode))
    live = LiveSample(loaded, traceset, sample, WINDOW, kvzip=True)
    rope = Rotary.from_meta(traceset.meta["model"]["rope"])
    views = [prefill_view(sample, layer, traceset.n_layers, WINDOW, rope) for layer in range(traceset.n_layers)]
    for name in PREFILL_ONCE:
        for value in budgets:
            budget = Budget(value)
            simulated, _ = compress_prefill(PRESETS[name], views, budget, sample.prompt_len)
            cache = live.recording.with_policy(PRESETS[name], budget)
            for layer, keep in enumerate(simulated):
                held = cache.kept_positions(layer)
                for head in range(keep.shape[0]):
                    assert torch.equal(held[head], keep[head].nonzero().flatten()), (name, value, layer, head)


@pytest.fixture(scope="module")
def tiny_float32_traces(tiny_model, tmp_path_factory):
    return tiny_model, capture_float32(tiny_model, tmp_path_factory.mktemp("live-sim") / "traces", 200)


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
    assert compressed.kl > outcome.kl
