"""The live cache and the simulator make the same decisions and count the same bytes.

On a sample captured in float32 from the same model, in both evaluation modes:
- every preset's prompt decision keeps the same positions per layer and KV head live and simulated;
- every-step and lagged policies (presets and compositions with pooled and unpooled scorers, drop,
  merge and quantize retention) keep the same positions at every decode step: the live cache's
  layers are fed the captured continuation's keys, values and queries (what the model hands them
  when it runs the reference continuation) and compared with the simulator's replay row by row;
- the simulator's `kv_bytes` is exactly what the live cache holds after the prompt's decision;
- mixed precision (quantize inside the budget) holds the same full- and low-precision tokens live
  and simulated, and no more bytes than dropping at the same budget.
KVzip is included: capture and the live cache run the same reconstruction pass.
"""

from __future__ import annotations

import pytest
import torch

from kvsim.live.runner import LiveSample
from kvsim.policies.allocators.head_adaptive import HeadAdaptive
from kvsim.policies.allocators.knots import Knots
from kvsim.policies.allocators.pyramid import Pyramid
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.policy import Policy
from kvsim.policies.presets import PRESETS
from kvsim.shape import ARCHITECTURES
from kvsim.policies.held import handed_to_retention
from kvsim.policies.retention import Merge, MixedPrecision, Quantize
from kvsim.policies.rope import Rotary
from kvsim.policies.schedules import EveryStep, Lagged, PrefillOnce
from kvsim.policies.scorers.accumulated_attention import AccumulatedAttention
from kvsim.policies.scorers.cake_indicator import CakeIndicator
from kvsim.policies.scorers.global_local import GlobalLocal
from kvsim.policies.scorers.key_norm import KeyNorm
from kvsim.policies.scorers.last_query import LastQuery
from kvsim.policies.scorers.mixture import Mixture
from kvsim.policies.scorers.recurrence import Recurrence
from kvsim.policies.scorers.window_attention import WindowAttention
from kvsim.sim.continuation import continuation_attention, prefill_view
from kvsim.sim.replay import replay_stepwise
from kvsim.sim.simulate import prepare_sample
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.store import MODES
from kvsim.traces.workloads import build_workload

WINDOW = 64  # the longest window a preset reads (expected_attention)
STEPWISE_PRESETS = [policy for policy in PRESETS.values() if policy.schedule.interval is not None]
# Compositions the search draws: pooled and unpooled scorers, every_step and lagged, every retention.
COMPOSED_STEPWISE = [
    Policy("pooled-window-every-step", WindowAttention(window=8, pool="max", kernel=7), Uniform(), EveryStep(recent=4)),
    Policy("avg-pooled-window-lagged", WindowAttention(window=16, pool="avg", kernel=5, gqa="max"), HeadAdaptive(alpha=0.2), Lagged(sinks=1, recent=4, every=2)),
    Policy("cake-lagged", CakeIndicator(window=8, kernel=5), Pyramid(beta=5), Lagged(recent=8, every=3)),
    Policy("accumulated-every-step-quantize", AccumulatedAttention(gqa="max"), Uniform(), EveryStep(sinks=2, recent=4), Quantize(nbits=4)),
    Policy("recurrence-lagged-merge", Recurrence(window=8), Uniform(), Lagged(recent=4, every=2), Merge(threshold=0.2)),
    Policy("last-query-every-step-quantize", LastQuery(), HeadAdaptive(alpha=0.5), EveryStep(), Quantize(nbits=2)),
    Policy("global-local-every-step", GlobalLocal(local_weight=0.3, window=8), Uniform(), EveryStep(sinks=4, recent=4)),
    Policy(
        "mixture-knots-every-step-mixed",
        Mixture(scorers=(WindowAttention(window=8), KeyNorm()), weights=(0.7, 0.3)),
        Knots(knots=(2.0, 0.5, 1.0), head_strength=0.5),
        EveryStep(sinks=1, recent=4),
        MixedPrecision(nbits=2, full_share=0.5),
    ),
]
MIXED_PRECISION = [
    Policy("window-mixed", WindowAttention(window=8), Uniform(), PrefillOnce(recent=4), MixedPrecision(nbits=2, full_share=0.5)),
    Policy(
        "mixture-knots-mixed",
        Mixture(scorers=(WindowAttention(window=16, pool="avg", kernel=5), AccumulatedAttention(gqa="max")), weights=(0.5, 0.5), normalize="z"),
        Knots(knots=(2.0, 0.5, 1.0), head_strength=0.7),
        PrefillOnce(sinks=1, recent=4),
        MixedPrecision(nbits=4, full_share=0.3),
    ),
    Policy("kivi-mixed", WindowAttention(window=8), Uniform(), PrefillOnce(sinks=2), MixedPrecision(full_share=0.4, key_bits=(2, 4), value_bits=(2, 2), key_group=8)),
    # Keys and values at their own widths per depth group (KVTuner-style).
    Policy("window-layerwise-bits", WindowAttention(window=8), Uniform(), PrefillOnce(recent=4), MixedPrecision(full_share=0.4, key_bits=(8, 2), value_bits=(4, 2))),
    COMPOSED_STEPWISE[-1],
]


def capture_float32(loaded, folder, context_tokens, max_new_tokens=4):
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=3, context_tokens=context_tokens, count_tokens=count)
    settings = CaptureSettings(window=WINDOW, max_new_tokens=max_new_tokens, storage_dtype="float32", modes=MODES, kvzip=True)
    return capture_traceset(loaded, samples, folder, settings, {"spec": "passkey", "seed": 3})


def rope_of(traceset):
    return Rotary.from_meta(traceset.meta["model"]["rope"])


def positions_of(keep: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in keep]


def assert_same_prefill_decisions(live, sample, shape, policies, budgets, rope):
    """Full-attention layers keep what the simulator keeps; sliding layers keep their last window − 1
    positions whatever the policy."""
    views = [prefill_view(sample, layer, shape, WINDOW, rope) for layer in shape.policy_layers]
    for policy in policies:
        for value in budgets:
            cache = live.recording.with_policy(policy, Budget(value))
            if views:
                simulated, _ = compress_prefill(policy, views, Budget(value), sample.prompt_len)
                for layer, keep in zip(shape.policy_layers, simulated):
                    held = [p.tolist() for p in cache.kept_positions(layer)]
                    assert held == positions_of(keep), (policy.name, value, sample.mode, layer)
            for layer, window in enumerate(shape.windows):
                if window is not None:
                    expected = list(range(sample.prompt_len - window + 1, sample.prompt_len))
                    assert all(p.tolist() == expected for p in cache.kept_positions(layer)), (policy.name, layer)


def simulated_steps(sample, shape, policy, budget, rope):
    """Per full-attention layer, the positions each head holds after every continuation row, from the simulator."""
    views = [prefill_view(sample, layer, shape, WINDOW, rope) for layer in shape.policy_layers]
    keeps, budgets = compress_prefill(policy, views, budget, sample.prompt_len)
    steps = []
    for index, layer in enumerate(shape.policy_layers):
        rows = []
        full = continuation_attention(sample, layer, WINDOW, shape.scaling)
        replay_stepwise(policy, views[index], full, keeps[index], budgets[index], lambda row, held: rows.append(
            [p.tolist() for p in held.kept_positions()]))
        steps.append(rows)
    return steps


def live_steps(live, sample, shape, policy, budget):
    """The same from the live cache, its full-attention layers fed the captured continuation row by row."""
    cache = live.recording.with_policy(policy, budget)
    steps = [[] for _ in shape.policy_layers]
    for row in range(sample.total_len - sample.prompt_len):
        position = sample.prompt_len + row
        for step, index in zip(steps, shape.policy_layers):
            trace = sample.layer(index)
            keys, values = cache.update(trace.k[None, :, position : position + 1], trace.v[None, :, position : position + 1], index)
            layer = cache.layers[index]
            layer.attend(trace.q[None, :, WINDOW + row : WINDOW + row + 1], layer.held.scaling)
            step.append([p.tolist() for p in cache.kept_positions(index)])
    return steps


def assert_same_stepwise_decisions(live, sample, shape, policies, rope, budget=Budget(0.3)):
    if not shape.policy_layers:
        pytest.skip("every layer slides: no policy decision to compare")
    for policy in policies:
        assert live_steps(live, sample, shape, policy, budget) == simulated_steps(sample, shape, policy, budget, rope), (
            policy.name, sample.mode)


def assert_same_bytes(live, traceset, sample, budgets):
    if not traceset.shape.policy_layers:
        pytest.skip("every layer slides: the simulator has nothing to replay")
    prepared = prepare_sample(traceset, sample)
    for policy in PRESETS.values():
        for value in budgets:
            predicted = sum(outcome.kv_bytes for outcome in prepared.replay(policy, Budget(value)))
            cache = live.recording.with_policy(policy, Budget(value))
            # The simulator reports the full-attention layers (sliding ones hold their window whatever the policy).
            held = sum(cache.layers[layer].held_bytes() for layer in traceset.shape.policy_layers)
            assert held == predicted, (policy.name, value)


def assert_same_mixed_precision(live, traceset, sample, budgets):
    """Same full- and low-precision positions per head live and simulated (the one choice,
    `handed_to_retention`, made on each side's own prefill view), same bytes, within dropping's."""
    if not traceset.shape.policy_layers:
        pytest.skip("every layer slides: the simulator has nothing to replay")
    prepared = prepare_sample(traceset, sample)
    for policy in MIXED_PRECISION:
        for value in budgets:
            keeps, layer_budgets = compress_prefill(policy, prepared.views, Budget(value), sample.prompt_len)
            cache = live.recording.with_policy(policy, Budget(value))
            for layer, view, keep, heads in zip(traceset.shape.policy_layers, prepared.views, keeps, layer_budgets):
                held = cache.layers[layer].held
                low = handed_to_retention(policy, view, keep, heads)
                assert [p.tolist() for p in held.kept_positions()] == positions_of(keep), (policy.name, value, layer)
                assert [p.tolist() for p in held.low.per_head(held.low.positions)] == positions_of(low), (policy.name, value, layer)
                # The low-precision keys and values the live cache reads are the simulator's.
                retained = policy.retention.retain(view.keys.float(), view.values.float(), keep, low, view.layer, view.n_layers)
                torch.testing.assert_close(held.low.keys.unpack().float(), retained.keys[low], atol=1e-6, rtol=0)
                torch.testing.assert_close(held.low.values.unpack().float(), retained.values[low], atol=1e-6, rtol=0)
            predicted = sum(outcome.kv_bytes for outcome in prepared.replay(policy, Budget(value)))
            dropping = sum(outcome.kv_bytes for outcome in prepared.replay(PRESETS["snapkv"], Budget(value)))
            held = sum(cache.layers[layer].held_bytes() for layer in traceset.shape.policy_layers)
            assert held == predicted <= dropping, (policy.name, value)
            assert cache.held_tokens()[1] > 0


@pytest.fixture(scope="module")
def tiny_float32_traces(tiny_any_model, tmp_path_factory):
    return tiny_any_model, capture_float32(tiny_any_model, tmp_path_factory.mktemp("live-sim") / "traces", 200)


@pytest.mark.parametrize("mode", MODES)
@torch.inference_mode()
def test_every_preset_decides_the_same_prompt_tokens_live_and_simulated(tiny_float32_traces, mode):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples(mode))
    live = LiveSample(loaded, traceset, sample, WINDOW, kvzip=True)
    assert_same_prefill_decisions(live, sample, traceset.shape, PRESETS.values(), (0.1, 0.3), rope_of(traceset))


@pytest.mark.parametrize("mode", MODES)
@torch.inference_mode()
def test_stepwise_policies_decide_the_same_tokens_at_every_step(tiny_float32_traces, mode):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples(mode))
    live = LiveSample(loaded, traceset, sample, WINDOW, kvzip=True)
    assert_same_stepwise_decisions(live, sample, traceset.shape, STEPWISE_PRESETS + COMPOSED_STEPWISE, rope_of(traceset))


@torch.inference_mode()
def test_the_simulator_predicts_exactly_the_bytes_the_live_cache_holds(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples("query-aware"))
    assert_same_bytes(LiveSample(loaded, traceset, sample, WINDOW, kvzip=True), traceset, sample, (0.1, 0.3))


@torch.inference_mode()
def test_mixed_precision_holds_the_same_tokens_live_and_simulated_within_droppings_bytes(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples("query-aware"))
    assert_same_mixed_precision(LiveSample(loaded, traceset, sample, WINDOW, kvzip=True), traceset, sample, (0.1, 0.3))


@pytest.mark.bundled
@torch.inference_mode()
def test_live_and_simulated_decisions_are_identical_on_the_bundled_model(bundled_model, tmp_path):
    traceset = capture_float32(bundled_model, tmp_path / "traces", 300, max_new_tokens=3)
    rope = rope_of(traceset)
    live = {}
    for mode in MODES:
        sample = next(traceset.samples(mode))
        live[mode] = LiveSample(bundled_model, traceset, sample, WINDOW, kvzip=True)
        assert_same_prefill_decisions(live[mode], sample, traceset.shape, PRESETS.values(), (0.1, 0.3), rope)
    # Step by step on the query-aware sample only (3 decode rows; the query-agnostic continuation
    # starts with the whole question, dozens of rows): the tiny models cover both modes.
    aware = next(traceset.samples("query-aware"))
    assert_same_stepwise_decisions(live["query-aware"], aware, traceset.shape, STEPWISE_PRESETS + COMPOSED_STEPWISE[:3], rope)
    assert_same_bytes(live["query-aware"], traceset, aware, (0.1,))


@torch.inference_mode()
def test_live_full_policy_reproduces_the_traced_continuation(tiny_float32_traces):
    loaded, traceset = tiny_float32_traces
    sample = next(traceset.samples("query-aware"))
    outcome = LiveSample(loaded, traceset, sample, WINDOW, kvzip=True).run(PRESETS["full"], Budget(0.5))
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
